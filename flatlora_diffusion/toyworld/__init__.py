"""The toy world: a tiny text-to-image universe of our own making, for the demo, the tests and the studies.

- world.py: the vocabulary (shapes, colours, patterns, scenes), captions, held-out pairs, the "sks toy" subject
- render.py: deterministic pictures of a scene
- architecture.py: the SD 1.x-architecture base model's sizes
- pretrain.py: the command that trains the base model and the judge from nothing
- judge.py: the classifier that reads a picture's attributes and spots the subject
- measure.py: prompt following of the base model, subject scores of a trained LoRA
- data.py: instance images, class images and held-out subject renders for a DreamBooth run

The base model is test and demo material, not a general image model. `--pretrained_model_name_or_path toyworld`
names it anywhere a model path is accepted.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "toyworld"
_HERE = Path(__file__).resolve().parent


def model_dir() -> Path:
    """The shipped base model: a StableDiffusionPipeline folder (package data)."""
    return _HERE / "model"


def judge_dir() -> Path:
    """The shipped judge: judge.safetensors + judge.json (package data)."""
    return _HERE / "judge"


def resolve_model_name(name_or_path: str) -> str:
    """`toyworld` means the shipped model folder; any other name or path is returned as it is."""
    return str(model_dir()) if name_or_path == MODEL_NAME else name_or_path
