"""In-memory peft models (``add_adapter`` or ``get_peft_model``) -> Lora, and their kohya / diffusers state dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from . import names
from .arch import arch_from_models, check_arch
from .lora import ExportError, Lora, LoraModule
from .writers import lora_to_diffusers, lora_to_kohya


def lora_from_models(components: Mapping[str, torch.nn.Module | None], adapter_name: str = "default") -> Lora:
    """Collect the LoRA layers of peft-wrapped models (``add_adapter`` or ``get_peft_model``).

    alpha is derived from each layer's own settings, so rank_pattern, alpha_pattern and rsLoRA come
    out right: alpha / r equals the layer's peft scaling.
    """
    from peft.tuners.lora import LoraLayer

    lora: Lora = {}
    for component, model in components.items():
        if model is None:
            continue
        model = _unwrap(model)
        if component not in names.COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {names.COMPONENTS}")
        modules: dict[str, LoraModule] = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if adapter_name in getattr(layer, "lora_embedding_A", {}):
                raise ExportError(f"{component}.{name}: LoRA on embeddings cannot be exported")
            if adapter_name not in layer.lora_A:
                continue
            if layer.lora_bias.get(adapter_name, False):
                raise ExportError(f"{component}.{name}: LoRA with a bias (lora_bias=True) cannot be exported")
            down = layer.lora_A[adapter_name].weight.detach()
            up = layer.lora_B[adapter_name].weight.detach()
            r = int(layer.r[adapter_name])
            scaling = float(layer.scaling[adapter_name])
            alpha = float(layer.lora_alpha[adapter_name])
            if layer.use_rslora.get(adapter_name, False):
                alpha = alpha * math.sqrt(r)
            if not math.isclose(alpha / r, scaling, rel_tol=1e-6):  # scale changed after creation
                alpha = scaling * r
            dora = None
            if layer.use_dora.get(adapter_name, False):
                magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach()
                dora = magnitude.reshape(int(up.shape[0]), *([1] * (down.dim() - 1)))
            path = names.canonical_path(component, name)
            modules[path] = LoraModule(down=down, up=up, alpha=alpha, dora_scale=dora)
        if modules:
            lora[component] = modules
    return lora


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers (their names add a prefix)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def kohya_state_dict(
    components: Mapping[str, torch.nn.Module | None], adapter_name: str = "default", arch: str | None = None
) -> dict[str, torch.Tensor]:
    """The kohya state dict (ComfyUI / AUTOMATIC1111) of in-memory peft-wrapped models.

    `components` maps "unet", "text_encoder", "text_encoder_2" to models. SDXL when
    "text_encoder_2" is given, the UNet is SDXL's (text_time added embedding), or `arch` says so.
    Tensors keep the models' dtype (meta tensors stay meta); alphas are float32 scalars.
    """
    check_arch(arch)
    arch = arch or arch_from_models(components)
    lora = lora_from_models(components, adapter_name)
    if not lora:
        raise ExportError(f"the models have no LoRA layers for adapter {adapter_name!r}")
    return lora_to_kohya(lora, arch)


def diffusers_state_dict(
    components: Mapping[str, torch.nn.Module | None], adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) in the format `pipe.load_lora_weights` loads, alpha kept."""
    lora = lora_from_models(components, adapter_name)
    if not lora:
        raise ExportError(f"the models have no LoRA layers for adapter {adapter_name!r}")
    return lora_to_diffusers(lora)
