"""Lora -> the tensors (and metadata) of a kohya file (ComfyUI / AUTOMATIC1111) or a diffusers file
(`pipe.load_lora_weights`, with `lora_adapter_metadata` so that lora_alpha survives)."""

from __future__ import annotations

import json

import torch

from . import names
from .arch import check_arch
from .lora import ExportError, Lora, LoraModule, most_common
from .names import UNET

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes


def lora_to_kohya(lora: Lora, arch: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya keys: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (0-dim float32), ``.dora_scale``."""
    check_arch(arch)
    out: dict[str, torch.Tensor] = {}
    for component in names.COMPONENTS:
        for path, module in sorted(lora.get(component, {}).items()):
            name = names.kohya_module_name(component, path, arch)
            out[f"{name}.lora_down.weight"] = _cast(module.down, dtype)
            out[f"{name}.lora_up.weight"] = _cast(module.up, dtype)
            # float32 whatever the weights' dtype: alpha / r must equal the trained scale, and fp16
            # cannot hold e.g. lora_alpha * sqrt(r) of rsLoRA. Both UIs read it with .item().
            out[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
            if module.dora_scale is not None:
                out[f"{name}.dora_scale"] = _cast(module.dora_scale, dtype)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _adapter_config(modules: dict[str, LoraModule], component: str) -> dict:
    """A LoraConfig dict (as diffusers stores it) that reproduces every module's rank and scale."""
    target = {}
    for path, module in modules.items():
        key = path if component == UNET else names.model_relative_te_path(path)
        target[key] = module
    r = most_common(m.rank for m in target.values())
    alpha = most_common(float(m.alpha) for m in target.values())
    doras = {m.dora_scale is not None for m in target.values()}
    if len(doras) > 1:
        raise ExportError(f"{component}: DoRA on some modules only cannot be written in diffusers format")
    for m in target.values():
        m.magnitude()  # input-axis DoRA cannot be expressed
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: m.rank for k, m in sorted(target.items()) if m.rank != r},
        "alpha_pattern": {k: float(m.alpha) for k, m in sorted(target.items()) if float(m.alpha) != alpha},
        "target_modules": sorted(target),
        "use_dora": doras == {True},
        "use_rslora": False,  # alpha already is the effective alpha: scale = alpha / r
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
    }


def lora_to_diffusers(lora: Lora, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft keys (``unet.<path>.lora_A.weight`` ...) plus the metadata diffusers reads lora_alpha from.

    Text-encoder keys keep ``text_model.``: diffusers strips it for a flattened CLIPTextModel and
    older transformers need it.
    """
    state: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, object] = {}
    for component in names.COMPONENTS:
        modules = lora.get(component)
        if not modules:
            continue
        for path, module in sorted(modules.items()):
            state[f"{component}.{path}.lora_A.weight"] = _cast(module.down, dtype)
            state[f"{component}.{path}.lora_B.weight"] = _cast(module.up, dtype)
            magnitude = module.magnitude()
            if magnitude is not None:
                if module.down.dim() > 2:  # peft keeps a conv magnitude as [1, out, 1, 1]
                    magnitude = magnitude.reshape(1, -1, *([1] * (module.down.dim() - 2)))
                # Text encoders load through transformers' peft integration, which expects the parameter
                # name "...lora_magnitude_vector.weight" (without it the magnitudes are silently dropped);
                # the UNet loader takes diffusers' bare name.
                suffix = "" if component == UNET else ".weight"
                state[f"{component}.{path}.lora_magnitude_vector{suffix}"] = _cast(magnitude, dtype)
        for key, value in _adapter_config(modules, component).items():
            adapter_metadata[f"{component}.{key}"] = value
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    return state, metadata
