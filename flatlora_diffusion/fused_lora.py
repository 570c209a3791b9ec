"""peft's LoRA Linear with its up projection, scaling and sum in one GEMM (`--fused_lora`).

peft computes `result + lora_B(lora_A(x)) * scaling`: after the two small matmuls, an activation-sized multiply and
an activation-sized add, and in the backward another activation-sized multiply (the scaling's gradient path). Here
the up projection adds itself onto the base layer's output inside cuBLAS (`result.addmm_(h, B^T, alpha=scaling)`,
in place where autograd allows it, accumulated in fp32 and rounded once), and the backward scales only the rank-sized
tensors. The base layer runs as peft runs it (Flat-LoRA's perturbed forward included). A numerics change within
one rounding of the compute dtype: peft rounds the up projection, the scaled product and the sum separately.

The trainer uses it in its training steps and its validation sampling. Only the plain case takes this path: one
active adapter, not merged, adapters enabled, no DoRA or other variant, no dropout, an nn.Linear base layer, no
adapter_names. Anything else runs peft's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .forward_switch import ForwardsSwitch


def _compute_dtype(result: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA matmuls run in: autocast's (what peft's matmuls would run in under it), else the base
    layer's output dtype."""
    device_type = result.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return result.dtype


class _LoraSum(torch.autograd.Function):
    """result + scaling * (x A^T) B^T, the up projection and sum in one addmm; the gradients by hand."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling: float, in_place: bool):
        dtype = _compute_dtype(result)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        h = x2 @ a.t()
        ctx.save_for_backward(x2, h, a, b)
        ctx.scaling = scaling
        ctx.meta = (x.shape, x.dtype, result.dtype, weight_a.dtype, weight_b.dtype)
        if in_place and result.dtype == dtype:  # see _sum_target
            result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=scaling)
            ctx.mark_dirty(result)
            return result
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(dtype), h, b.t(), alpha=scaling)
        return out.view(*result.shape[:-1], out.shape[-1]).to(result.dtype)  # peft returns the base output's dtype

    @staticmethod
    def backward(ctx, grad_out):
        x2, h, a, b = ctx.saved_tensors
        x_shape, x_dtype, result_dtype, a_dtype, b_dtype = ctx.meta
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)
        dh = (g @ b).mul_(ctx.scaling)  # rank-sized: the scaling costs nothing here
        grad_result = grad_out.to(result_dtype) if ctx.needs_input_grad[0] else None
        grad_x = (dh @ a).view(x_shape).to(x_dtype) if ctx.needs_input_grad[1] else None
        grad_a = (dh.t() @ x2).to(a_dtype) if ctx.needs_input_grad[2] else None
        grad_b = (g.t() @ h).mul_(ctx.scaling).to(b_dtype) if ctx.needs_input_grad[3] else None
        return grad_result, grad_x, grad_a, grad_b, None, None


def _sum_target(result: torch.Tensor) -> torch.Tensor | None:
    """The tensor the LoRA sum can be added into in place, instead of addmm into a new one, which first copies its
    addend there (an activation-sized copy per layer); None: out of place. The base layer's output is
    fused_forward's alone and no backward needs it, so it may be overwritten when autograd sees all of it:
    - an output that is no view (nn.Linear's without bias, Flat-LoRA's perturbed layers'): itself;
    - nn.Linear's output for a 3-d input with bias, an autograd view of the whole 2-d addmm output: that tensor,
      which carries the graph (in place on the view itself, autograd's CopySlices would clone and copy the
      gradient in backward);
    - anything else out of place, e.g. a custom autograd function's output that views a tensor of its own: that
      tensor is outside the graph, and writing it would cut the gradient to the base layer. Under torch.compile
      too: inductor fuses the sum itself."""
    if torch.compiler.is_compiling() or not result.is_contiguous():
        return None
    if not result._is_view():
        return result
    base = result._base
    if result.grad_fn is None:  # no graph to keep (sampling, or nothing upstream needs a gradient)
        sees_whole = not base.requires_grad
    else:  # result must be autograd's plain view of base, so that the graph runs through base
        sees_whole = (result.grad_fn.name() == "ViewBackward0" and base.grad_fn is not None
                      and result.grad_fn.next_functions[0][0] is base.grad_fn)
    if (sees_whole and base._base is None and base.is_contiguous()
            and base.data_ptr() == result.data_ptr() and base.numel() == result.numel()):
        return base
    return None


def _fusable(layer: nn.Module) -> bool:
    """Whether peft's forward of `layer` (a peft LoRA layer) is the plain `result + B(A(drop(x))) * s` with
    nothing that the fused path leaves out (module docstring)."""
    from peft.tuners.lora import Linear

    if type(layer) is not Linear or not isinstance(layer.get_base_layer(), nn.Linear):
        return False
    dropouts = layer.lora_dropout.values()
    return (len(layer.lora_A) == 1 and not getattr(layer, "lora_variant", {})
            and not any(getattr(layer, "use_dora", {}).values())
            and all(isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and d.p == 0) for d in dropouts))


def fused_forward(layer: nn.Module):
    """A forward for the peft LoRA Linear `layer` that fuses its LoRA branch when the call is the plain case, and
    is peft's own forward otherwise (checked at each call: adapters can be disabled or merged later)."""
    peft_forward = type(layer).forward.__get__(layer)
    (name,) = layer.lora_A.keys()

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (args or kwargs or layer.disable_adapters or layer.merged
                or list(layer.active_adapters) != [name]):
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x)
        target = _sum_target(result)
        out = _LoraSum.apply(result if target is None else target, x, layer.lora_A[name].weight,
                             layer.lora_B[name].weight, float(layer.scaling[name]), target is not None)
        return out.view(result.shape)

    return forward


def fused_lora_forwards(models) -> list[tuple[nn.Module, object]]:
    """(layer, its fused forward) for every fusable peft LoRA Linear of `models`, made once (torch.compile guards
    on the forwards' identity, as for norms.norm_forwards); forward_switch patches them in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(m, fused_forward(m)) for model in models for m in model.modules()
            if isinstance(m, BaseTunerLayer) and _fusable(m)]


def fused_lora_switch(models, wanted: bool, mixed_precision: str) -> ForwardsSwitch:
    """The --fused_lora switch of `models`: inside `with switch():` their LoRA layers are fused when the flag is set
    under bf16 or fp16 mixed precision (where the saved activation-sized passes matter); nothing changes otherwise."""
    return ForwardsSwitch(lambda: fused_lora_forwards(models), wanted and mixed_precision in ("bf16", "fp16"))
