"""--low_memory's weights: the UNet's frozen base weights stored in float8_e4m3fn and computed in bf16.

The float8 weight is what stays resident (SDXL's UNet: ~2.6 GB instead of ~5.1 GB in bf16); each forward of a
frozen Linear / Conv2d computes with a compute-dtype copy of its weight and bias, made on the fly and freed with the
activations that use it (what autograd keeps for backward is that copy; gradient checkpointing, which the mode turns
on, bounds it to one block). float8 is only a storage format here: no matmul runs in float8, so the same code runs
on a CPU.

Which layers, and the plumbing, are diffusers' layerwise casting (ModelMixin.enable_layerwise_casting): its skip
patterns (norms, embeddings: precision-sensitive) and its hook registry, under its hook name, so that diffusers'
`model.dtype` reports the compute dtype and its pipelines make bf16 latents. What differs is how the hook casts.
diffusers' LayerwiseCastingHook casts the module itself, `module.to(bf16)` before the forward and `module.to(float8)`
after, which rebinds the parameter's data; non-reentrant gradient checkpointing (diffusers' default) keeps frozen
parameters for backward by reference, so the recomputed block's backward would find the float8 data again
(torch: "Recomputed values ... have different metadata"). Here the parameter is never rebound: only copies are made.
Trainable parameters (peft's lora_A / lora_B) are never hooked: they stay fp32.

Flat-LoRA's perturbed layers replace the base layer's forward (this hook with it) during a step and read the float8
weight directly: W + eps is formed from W upcast to fp32 (flat/reference.py; on a GPU the fused kernels, which widen
W as they load it), so no bf16 copy of the clean W is made.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from torch import nn

STORAGE_DTYPE = torch.float8_e4m3fn
_HOOK_NAME = "layerwise_casting"  # diffusers' name: its get_parameter_dtype reports our hook's compute_dtype
_CAST_TYPES = (nn.Linear, nn.Conv2d)  # exact types: a subclass may compute differently


class _CastCopyHook(ModelHook):
    """Stores the module's parameters in float8; its forward computes with compute-dtype copies of them."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.storage_dtype, self.compute_dtype = STORAGE_DTYPE, compute_dtype

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=STORAGE_DTYPE)

    def deinitalize_hook(self, module: nn.Module) -> nn.Module:  # diffusers' spelling
        raise NotImplementedError("float8 storage cannot be undone without losing precision; reload the model")

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output

    def new_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = module.weight.to(self.compute_dtype)
        bias = None if module.bias is None else module.bias.to(self.compute_dtype)
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)


def skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """diffusers' layers to keep in the compute dtype: its defaults plus the model class's own list."""
    own = (getattr(model, "_skip_layerwise_casting_patterns", None) or []) + (getattr(model, "_keep_in_fp32_modules", None) or [])
    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(own)


def store_frozen_weights_in_fp8(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen Linear / Conv2d of a diffusers model (LoRA already added) in float8, computed in
    `compute_dtype`; returns the number of weights now stored in float8. Layers with a trainable parameter (the LoRA
    adapters) and those matching diffusers' skip patterns keep their dtype."""
    patterns = skip_patterns(model)
    for name, module in model.named_modules():
        if type(module) not in _CAST_TYPES or any(p.requires_grad for p in module.parameters()):
            continue
        if any(re.search(pattern, name) for pattern in patterns):
            continue
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_CastCopyHook(compute_dtype), _HOOK_NAME)
    return sum(p.numel() for p in model.parameters() if p.dtype == STORAGE_DTYPE)
