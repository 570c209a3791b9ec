"""The toy world's DreamBooth task: one definition of its training settings, for the demo, the target
measurement (measure.py) and the Flat-LoRA study (benchmarks/flat_study.py).

Five renders of the subject on the plain background, "a photo of sks toy", prior preservation with twenty
rendered plain toys as class pictures ("a photo of a toy"), 100 steps of rank-4 LoRA on the UNet's and the
text encoder's attention at learning rates 5e-3 and 2e-3. Only `flat_sigma` differs between a LoRA and a
Flat-LoRA run.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import MODEL_NAME, resolve_model_name
from .data import write_class_images, write_instance_images
from .world import CLASS_PROMPT, SUBJECT_PROMPT

INSTANCE_IMAGES = 5
CLASS_IMAGES = 20


def has_class_variety(model: str = MODEL_NAME) -> bool:
    """Whether the world's base model learnt "a toy" with the class's own variety (pretrain --set
    class_variety=F > 0): its prior-preservation pictures must then be that variety too. Read from the
    pretrain.json beside the pipeline folder: the first pretraining's setting, or the last --retrain-unet's or
    --finetune-unet's."""
    record_file = Path(resolve_model_name(model)).parent / "pretrain.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    variety = record.get("config", {}).get("class_variety", 0.0)
    for stage in record.get("stages", []):
        if stage.get("command", "").endswith(("--retrain-unet", "--finetune-unet")):
            variety = stage.get("config", {}).get("class_variety", 0.0)
    return variety > 0


def write_task_data(folder, seed: int = 0, model: str = MODEL_NAME) -> tuple[Path, Path]:
    """(instance folder, class folder) of the task under `folder`, the class pictures as `model`'s world draws
    the class (has_class_variety)."""
    folder = Path(folder)
    write_instance_images(folder / "subject", n=INSTANCE_IMAGES, seed=seed)
    write_class_images(folder / "class", n=CLASS_IMAGES, seed=seed, varied=has_class_variety(model))
    return folder / "subject", folder / "class"


def dreambooth_settings(output_dir, instance_dir, class_dir, *, flat_sigma: float, seed: int = 0,
                        steps: int = 100, model: str = MODEL_NAME) -> dict:
    """TrainConfig settings of one run of the task (a dict for config.make_config); `model`: another world's
    pipeline folder (a pretraining trial) instead of the shipped one."""
    return {
        "pretrained_model_name_or_path": model,
        "instance_data_dir": str(instance_dir),
        "instance_prompt": SUBJECT_PROMPT,
        "with_prior_preservation": True,
        "class_data_dir": str(class_dir),
        "class_prompt": CLASS_PROMPT,
        "num_class_images": CLASS_IMAGES,  # all rendered: nothing to generate
        "output_dir": str(output_dir),
        "resolution": 64,
        "train_batch_size": 1,
        "max_train_steps": steps,
        "learning_rate": 5e-3,
        # Said, not left to the default: at 5e-6 (SDXL's default) the text-encoder LoRA does not learn "sks" at all,
        # and the LoRA can only move every toy, the class prompt's too (benchmarks/HISTORY.md, session 7). At the
        # UNet's 5e-3 it learns "sks" so hard that the scene words lose (night turns into the instance pictures'
        # pale background); at 2e-3 the subject is found as often and the scene asked for far more often, paired
        # over 32 training seeds (benchmarks/results/toyworld_recipe_seeds.json, session 13).
        "text_encoder_lr": 2e-3,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "rank": 4,
        "seed": seed,
        "flat_sigma": flat_sigma,
        "train_text_encoder": True,
        "random_flip": True,
        "checkpointing_steps": 10**9,
        # Each picture encoded once, before the first step (demo: 2-3 s less per run on a CPU core). With it the
        # demo's seed measured LoRA 80 % / Flat-LoRA 95 % subject, 87.5 / 92.5 % scenes (82.5 / 87.5, 75 / 72.5
        # without: benchmarks/results/toyworld_dreambooth.json, HISTORY.md); the 32-seed file above predates it.
        "cache_latents": True,
    }
