"""A LoRA file the trainer wrote, loaded by diffusers into a FRESH copy of the base model, reproduces the
validation images the trained model made in memory — for plain LoRA and for PiSSA (whose adapter was trained
on a modified base and is converted back to one for the original base)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.training_helpers import run


def _regenerate(run_dir: Path, with_lora: bool) -> np.ndarray:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(cfg["pretrained_model_name_or_path"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if with_lora:
        pipe.load_lora_weights(str(run_dir / "pytorch_lora_weights.safetensors"))
    image = pipe(cfg["validation_prompt"][0], num_inference_steps=cfg["validation_inference_steps"],
                 guidance_scale=cfg["validation_guidance_scale"], height=64, width=64,
                 generator=torch.Generator().manual_seed(cfg["validation_seeds"][0])).images[0]
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_trained_file_reproduces_the_validation_image(tiny, tmp_path, init):
    out = tmp_path / init
    run(tiny, out, init_lora_weights=init, max_train_steps=6, learning_rate=2e-2, train_text_encoder=True,
        validation_prompt=["a photo of sks toy"], validation_seeds=[3], validation_inference_steps=4)
    trained = np.asarray(Image.open(out / "samples" / "step_000006" / "0_3.png"), dtype=np.float32)
    with_lora = _regenerate(out, with_lora=True)
    without = _regenerate(out, with_lora=False)
    assert np.abs(with_lora - trained).max() <= 2  # PNG rounding
    assert np.abs(without - trained).mean() > 2  # and the LoRA really changed the image
    meta = json.loads(__import__("safetensors").safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt")
                      .metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == (8 if init == "pissa" else 4)  # PiSSA ships [B, -B0] @ [A; A0]: rank 2r
