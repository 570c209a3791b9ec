"""Every LoRA file the project writes is byte for byte what it was: names, tensor order, dtypes, metadata, hash.

A demo-like run directory of each architecture is built from deterministic inputs: the tiny pipelines lend only
their module names and shapes, every LoRA tensor is set to small dyadic numbers (exact in fp16, bf16 and fp32,
whatever the machine), and the settings and times are fixed. The trainer's writers (diffusers_file_contents,
save_kohya_lora) write the run's own files, and the `export` command turns the run, a checkpoint of it and its
files into every format and dtype it offers. The sha256 of each file (see _file_digest) is compared with the digests taken on the
code before export.py was split into a package (commit e3546ee); a new version number or a deliberate change of
a file format changes them, and then this table, on purpose (the SD 1.x files last when ss_text_encoder_lr became
the learning rate, as the SD 1.x text encoder's default now is).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from flatlora_diffusion import cli
from flatlora_diffusion.config import make_config, save_yaml
from flatlora_diffusion.export import diffusers_file_contents, lora_from_models, save_kohya_lora
from flatlora_diffusion.models import add_lora, lora_config
from flatlora_diffusion.safetensors_io import save_safetensors_atomic
from tests.training_helpers import settings as run_settings

STARTED, FINISHED = "2025-01-02T03:04:05+00:00", "2025-01-02T03:14:05+00:00"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture
def utc(monkeypatch):
    """modelspec.date is written in local time: the digests hold in one time zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _components(pipeline_dir: Path, arch: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet"),
             "text_encoder": CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")}
    if arch == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(pipeline_dir, subfolder="text_encoder_2")
    return parts


def _deterministic_lora(parts: dict, use_dora: bool) -> None:
    """LoRA r 4, alpha 8 on every part, each LoRA tensor filled with multiples of 1/64 in [-0.25, 0.25]
    (a DoRA magnitude with 1 + k/8): exactly representable in every dtype a file is written in."""
    for name, model in parts.items():
        targets = UNET_TARGETS if name == "unet" else TE_TARGETS
        add_lora(model, lora_config(4, 8.0, targets, 0.0, use_dora, False, "gaussian"))
        with torch.no_grad():
            for i, (pname, param) in enumerate(sorted(model.named_parameters())):
                if "lora_magnitude_vector" in pname:
                    param.copy_(1 + (torch.arange(param.numel()) % 5).reshape(param.shape) / 8)
                elif "lora_" in pname:
                    values = (torch.arange(param.numel()) * 7 + i) % 33 - 16
                    param.copy_((values / 64).reshape(param.shape))


def _write_run(tiny, run: Path, arch: str, use_dora: bool) -> dict:
    """A finished run's folder as the trainer leaves it, and one checkpoint with its LoRA file."""
    run.mkdir()
    cfg = make_config(run_settings(tiny, run, arch, train_text_encoder=True, use_dora=use_dora, rank=4,
                                   lora_alpha=8.0, output_name="sks_toy", max_train_steps=4))
    cfg.resolve_arch_defaults(arch)  # as train() does before it writes config.yaml
    save_yaml(cfg, run / "config.yaml")
    (run / "status.json").write_text(json.dumps(
        {"state": "completed", "step": 4, "total": 4, "started_at": STARTED, "finished_at": FINISHED}))
    parts = _components(tiny[arch], arch)
    _deterministic_lora(parts, use_dora)
    lora = lora_from_models(parts)
    file_settings = {**cfg.to_dict(), "flat_seed": cfg.seed, "num_train_images": 3, "num_reg_images": 0,
                     "training_started_at": STARTED, "mixed_precision": "no", "optimizer": cfg.optimizer,
                     "global_step": 4}
    state, metadata = diffusers_file_contents(lora, file_settings, arch)
    save_safetensors_atomic(state, run / "pytorch_lora_weights.safetensors", metadata, overwrite=True)
    save_kohya_lora(parts, run / "sks_toy.safetensors", file_settings, arch=arch, dtype="fp16", overwrite=True,
                    lora=lora)
    checkpoint = run / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text(json.dumps({"global_step": 2}))
    state, metadata = diffusers_file_contents(lora, {**file_settings, "global_step": 2}, arch)
    save_safetensors_atomic(state, checkpoint / "pytorch_lora_weights.safetensors", metadata)
    return parts


def _export(*args: str) -> None:
    assert cli.main(["export", *map(str, args)]) == 0


def _exports(run: Path, out: Path) -> None:
    """Each way of the `export` command: a run in both formats and all dtypes, with a metadata override,
    a checkpoint, and files of either format back into the other."""
    out.mkdir()
    _export(run)  # the kohya file the trainer wrote: up to date, nothing written
    _export(run, "--format", "diffusers")
    _export(run, "--dtype", "bf16", "-o", out / "run_bf16.safetensors")
    _export(run, "--dtype", "fp32", "--metadata", "modelspec.author=me", "-o", out / "run_fp32.safetensors")
    _export(run / "checkpoints" / "checkpoint-2")
    _export(run / "sks_toy.safetensors", "--format", "diffusers", "-o", out / "kohya_to_diffusers.safetensors")
    _export(run / "pytorch_lora_weights.safetensors", "-o", out / "diffusers_to_kohya.safetensors")


def _file_digest(path: Path) -> str:
    """sha256 of a safetensors file with its JSON header's keys sorted. safetensors writes the metadata map in an
    order that changes from one process to the next (a Rust HashMap), so the raw bytes of two identical exports
    differ; everything else counts: every name, dtype, shape, offset, metadata entry and tensor byte."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + blob[8 + n:]).hexdigest()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _file_digest(p) for p in sorted(root.rglob("*.safetensors"))}


EXPECTED = {
    "sd15": {
        "out/diffusers_to_kohya.safetensors":
            "9f74f41c71b9ae2c8d1018f6ad69bb80c2429024d4ce490447d160a45b45e42f",
        "out/kohya_to_diffusers.safetensors":
            "794197a1c7c014801926f9c0055f5d4a3b7fbc40dba0ee4bb554544a03514006",
        "out/run_bf16.safetensors":
            "deff8adaf7b69f29f7e6915bab32f2e58f8f25f2300794b5d7d92aff8e72100d",
        "out/run_fp32.safetensors":
            "1384fe80135cfcc4e65ee42fe17fc2164cfcd7becb1c4771d3f3837d46224990",
        "run/checkpoints/checkpoint-2/pytorch_lora_weights.safetensors":
            "b86ba0e68a62a46a81f6d9a7a3138e8d291355709584e1d16356888576862ee3",
        "run/pytorch_lora_weights.safetensors":
            "80a0c325121594859a9401ff15a2c9d421a6fe58a3be0ada8c4e2226a5d63b5d",
        "run/sks_toy-step00000002.safetensors":
            "4844f0bfc04519c9fab218d562dbd8e63be3ed22dedfe90580d6f845b229fc5d",
        "run/sks_toy.safetensors":
            "9f74f41c71b9ae2c8d1018f6ad69bb80c2429024d4ce490447d160a45b45e42f",
        "run/sks_toy_diffusers.safetensors":
            "172a85d9ac850eb53ac92026f61e4b510362fc2a1939b0a5579fc352c3260738",
    },
    "sdxl-dora": {
        "out/diffusers_to_kohya.safetensors":
            "18c7a776a2378acd5d55601dca86e6a3d58746e560bc01767409b4f9bc7e5847",
        "out/kohya_to_diffusers.safetensors":
            "2948c2e0d5a1393a4d6c6cf081200d7b7bb7c40a24532a9f9f32ec4acb282642",
        "out/run_bf16.safetensors":
            "c5d3145bde3d10af0089c2f634789f0d936756b7131c913f14511dde48f5fa31",
        "out/run_fp32.safetensors":
            "97aaecb27aed848074e3104f0ac7f278d4e4ea38920e3b4f06d4f09e60123d92",
        "run/checkpoints/checkpoint-2/pytorch_lora_weights.safetensors":
            "09ab9bd775e75d378c4b845689411dac38cc834d7c4e2708ac13053aedd32f47",
        "run/pytorch_lora_weights.safetensors":
            "1c36879c2ab7b91c9ea237493455916586fb400b78ab43cfc197600f0da5ffbf",
        "run/sks_toy-step00000002.safetensors":
            "bfcc1585eeac233a181d7083d1ab00de976b14e0bbfb1a5cfee86336dcc6525e",
        "run/sks_toy.safetensors":
            "18c7a776a2378acd5d55601dca86e6a3d58746e560bc01767409b4f9bc7e5847",
        "run/sks_toy_diffusers.safetensors":
            "83d83c490e1d337054733fd208b4cde10516e3652b27be56c23c9e7d12bc2adf",
    },
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_lora_files_are_byte_identical(tiny, tmp_path, utc, case):
    arch, _, variant = case.partition("-")
    run = tmp_path / "run"
    _write_run(tiny, run, arch, use_dora=variant == "dora")
    _exports(run, tmp_path / "out")
    assert _digests(tmp_path) == EXPECTED[case]
