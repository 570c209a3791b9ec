"""Shared by the trainer tests: tiny offline models and images, and a one-call training run."""

import json
from pathlib import Path

from safetensors.torch import load_file

from flatlora_diffusion.config import make_config
from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline
from flatlora_diffusion.train import train


def make_tiny_assets(base: Path) -> dict:
    return {
        "sd15": make_tiny_pipeline(base / "sd15", "sd15", seed=0),
        "sdxl": make_tiny_pipeline(base / "sdxl", "sdxl", seed=0),
        "images": Path(make_subject_images(base / "images", n=3, size=96, seed=0)[0]).parent,
        "base": base,
    }


def settings(tiny, out, arch="sd15", **over):
    """Small, fast training settings on the tiny model; a value of None removes the setting."""
    s = {
        "pretrained_model_name_or_path": str(tiny[arch]),
        "instance_data_dir": str(tiny["images"]),
        "instance_prompt": "a photo of sks toy",
        "output_dir": str(out),
        "resolution": 64,
        "train_batch_size": 1,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "seed": 7,
        "flat_sigma": 0.1,
        "flat_schedule": "constant",
        "checkpointing_steps": 1000,
    }
    s.update(over)
    return {k: v for k, v in s.items() if v is not None}


def run(tiny, out, **over):
    from accelerate.state import AcceleratorState

    try:
        return train(make_config(settings(tiny, out, **over)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own Accelerator


def lora_weights(run_dir):
    return load_file(Path(run_dir) / "pytorch_lora_weights.safetensors")


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
