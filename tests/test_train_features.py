"""Trainer features beyond test_train.py, each checked by an effect it must have (not just "it ran"):
single-file checkpoints, a separate VAE, aspect-ratio buckets with SDXL micro-conditioning, prior
preservation with generated class images, bf16 on the CPU, gradient checkpointing, latent and text-embedding
caches, Min-SNR / noise offset / lr schedules, DoRA / rsLoRA / alpha != rank files that diffusers loads,
checkpoint rotation and resume by bare name, the export command on a run, kohya "N_token" folders.

All on tiny offline models at 64 px, a few steps each, on the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from flatlora_diffusion import step as step_module
from flatlora_diffusion import train as train_module
from flatlora_diffusion.config import LR_SCHEDULERS, make_config
from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline, save_single_file_checkpoint
from flatlora_diffusion.train import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_features")
    return {
        "sd15": make_tiny_pipeline(base / "sd15", "sd15", seed=0),
        "sdxl": make_tiny_pipeline(base / "sdxl", "sdxl", seed=0),
        "images": Path(make_subject_images(base / "images", n=3, size=96, seed=0)[0]).parent,
        "base": base,
    }


def settings(tiny, out, arch="sd15", **over):
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
        AcceleratorState._reset_state(reset_partial_state=True)


def lora_weights(run_dir):
    return load_file(Path(run_dir) / "pytorch_lora_weights.safetensors")


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [m["loss"] for m in metrics(run_dir)]


def file_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def assert_weights_close(a, b, rtol=1e-5, atol=1e-8):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def assert_weights_differ(a, b):
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.fixture
def capture_trainer(monkeypatch):
    """The _Trainer of the next run(s), kept after its _finish (models, LoRA, components in memory)."""
    seen = []
    original = train_module._Trainer._finish

    def finish(self):
        seen.append(self)
        return original(self)

    monkeypatch.setattr(train_module._Trainer, "_finish", finish)
    return seen


@pytest.fixture
def record_loss_calls(monkeypatch):
    """Every call of step.diffusion_loss the trainer makes: latents shape, time_ids, n_class."""
    calls = []
    original = step_module.diffusion_loss

    def recording(models, latents, prompt_embeds, pooled, time_ids, generator, options, n_class=0):
        calls.append({"latents": tuple(latents.shape), "n_class": n_class,
                      "time_ids": None if time_ids is None else time_ids.detach().clone(),
                      "prior_loss_weight": options.prior_loss_weight})
        return original(models, latents, prompt_embeds, pooled, time_ids, generator, options, n_class)

    monkeypatch.setattr(step_module, "diffusion_loss", recording)
    return calls


# ==========================================================================================================
# 1. single-file checkpoints
# ==========================================================================================================
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_checkpoint_trains_like_its_folder(tiny, tmp_path, arch):
    single = save_single_file_checkpoint(tiny[arch], tmp_path / f"{arch}-model.safetensors")
    # no learning_rate: its default depends on the architecture, which must come from the file
    from_file = run(tiny, tmp_path / "file", arch=arch, learning_rate=None,
                    pretrained_model_name_or_path=str(single), single_file_config=str(tiny[arch]))
    from_folder = run(tiny, tmp_path / "folder", arch=arch, learning_rate=None)
    cfg = yaml.safe_load((from_file.path / "config.yaml").read_text())
    assert cfg["learning_rate"] == {"sd15": 5e-4, "sdxl": 1e-4}[arch]
    assert cfg["pretrained_model_name_or_path"] == str(single)
    kohya_md = file_metadata(from_file.path / "file.safetensors")
    assert kohya_md["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch]
    # the same weights, loaded from one file instead of a folder: the same training
    assert_weights_close(lora_weights(from_file.path), lora_weights(from_folder.path))
    assert losses(from_file.path) == pytest.approx(losses(from_folder.path), rel=1e-5)
