"""GroupNorm and LayerNorm that return the compute dtype under autocast (`--bf16_norms`, the trainer's default).

CUDA autocast runs group_norm and layer_norm in fp32 and returns fp32. In a diffusers UNet every consumer of a norm
casts that output back to bf16 (up to six casts of one output: q, k and v and their LoRA inputs), and the gradients
come back through those casts in fp32 and are summed in fp32. A norm that takes and returns bf16 (its statistics
still accumulate in fp32 inside the kernel) removes those copies: SDXL's graphed LoRA step on one H100, 257.2 ->
215.4 ms at batch 4 and 102.2 -> 89.9 ms at batch 1, 5.9 GiB less peak memory at batch 4
(benchmarks/results/mfu_candidates_regional_norms_sdxl_h100.json). A numerics change: the normalised values are
rounded to bf16 where the consumers rounded them before, and their gradients are summed in bf16.
The trainer applies it to its training steps and to its validation sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .forward_switch import ForwardsSwitch

NORMS = (nn.GroupNorm, nn.LayerNorm)


def forward_in_compute_dtype(norm: nn.GroupNorm | nn.LayerNorm):
    """A forward for `norm` taking and returning autocast's compute dtype (outside autocast: its input's dtype)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        weight = None if norm.weight is None else norm.weight.to(dtype)
        bias = None if norm.bias is None else norm.bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            if isinstance(norm, nn.GroupNorm):
                return F.group_norm(x.to(dtype), norm.num_groups, weight, bias, norm.eps)
            return F.layer_norm(x.to(dtype), norm.normalized_shape, weight, bias, norm.eps)

    return forward


def norm_forwards(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(norm, its compute-dtype forward) for every GroupNorm and LayerNorm of `model`, made once: the forwards are
    patched in at every step, and torch.compile's guards need the same objects each time (--torch_compile)."""
    return [(m, forward_in_compute_dtype(m)) for m in model.modules() if isinstance(m, NORMS)]


def compute_dtype_norms(model: nn.Module, wanted: bool, mixed_precision: str) -> ForwardsSwitch:
    """The --bf16_norms switch of `model`: its norms return the compute dtype inside `with switch():` when the flag
    is set under bf16 mixed precision; nothing changes otherwise."""
    return ForwardsSwitch(lambda: norm_forwards(model), wanted and mixed_precision == "bf16")
