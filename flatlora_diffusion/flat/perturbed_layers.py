"""How a frozen layer computes with W + eps, whichever path supplies it (reference.py or fused.py).

A perturbed layer's forward is a custom autograd function that asks its noise source for W + eps, keeps only a
reference to the source (W is never copied, never written), and asks again in backward and in gradient-checkpoint
recomputation, so all three see the same eps. A noise source has two methods:

    forward_seen(input_needs_grad)       told at each forward whether backward will need W + eps again
    weight(dtype, backward=False)        W + eps in the compute dtype, as a temporary
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the un-perturbed layer would compute in: autocast's when it is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _start_forward(ctx, x: torch.Tensor, source):
    """The compute dtype of a perturbed layer's forward and its W + eps in it. Every operand is then in the compute
    dtype (autocast's, when it is on), so autocast's casts are no-ops and need no `autocast(enabled=False)` block
    (which costs host time on each of ~600 layers)."""
    dtype = _compute_dtype(x)
    source.forward_seen(ctx.needs_input_grad[0])
    return dtype, source.weight(dtype)


def _check_frozen(ctx) -> None:
    if ctx.needs_input_grad[1]:
        raise RuntimeError("Flat-LoRA perturbs frozen weights only; this layer's base weight requires grad")


class _NoisyLinear(torch.autograd.Function):
    """y = x (W + eps)^T + b. Keeps only the noise source (W is referenced, never copied); backward asks it for
    W + eps again, regenerated from the same key."""

    @staticmethod
    def forward(ctx, x, weight, bias, source):
        dtype, w = _start_forward(ctx, x, source)
        out = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
        ctx.source, ctx.dtype, ctx.x_dtype = source, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # for a 3-d input with bias, F.linear's output views its 2-d result; returned as a plain tensor (the same
        # memory), a caller may write it in place (--fused_lora adds its LoRA branch there), which autograd forbids
        # on a view made inside a custom function
        return torch.ops.aten._unsafe_view(out, out.shape) if out._is_view() else out

    @staticmethod
    def backward(ctx, grad_out):
        _check_frozen(ctx)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.source.weight(ctx.dtype, backward=True)
            grad_x = (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


class _NoisyConv2d(torch.autograd.Function):
    """conv2d(x, W + eps) + b for zero-padded convolutions; W + eps is asked for again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, source, conv_args):
        stride, padding, dilation, groups = conv_args
        dtype, w = _start_forward(ctx, x, source)
        out = F.conv2d(x.to(dtype), w, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)
        ctx.source, ctx.dtype, ctx.x_dtype, ctx.x_shape, ctx.conv_args = source, dtype, x.dtype, x.shape, conv_args
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _check_frozen(ctx)
        stride, padding, dilation, groups = ctx.conv_args
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.source.weight(ctx.dtype, backward=True)
            grad_x = torch.nn.grad.conv2d_input(
                ctx.x_shape, w, grad_out.to(ctx.dtype), stride, padding, dilation, groups
            ).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None


_MISSING = object()  # the instance had no forward of its own


@contextlib.contextmanager
def patched_forwards():
    """Yields patch(module, forward): the module computes with `forward` until the block ends, then exactly as
    before (a forward the instance already had of its own is put back, else the class's is used again)."""
    patched: list[tuple[nn.Module, object]] = []

    def patch(module: nn.Module, forward) -> None:
        patched.append((module, module.__dict__.get("forward", _MISSING)))
        module.forward = forward

    try:
        yield patch
    finally:
        for module, previous in reversed(patched):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous


def noisy_forward(base: nn.Module, source):
    """A replacement forward for one frozen base layer (Linear or zero-padded Conv2d) computing with the W + eps
    that `source` (ReferenceNoise, or the fast engine's equivalent) provides.

    Excluded from torch.compile (--torch_compile's compiled blocks break around it): dynamo cannot trace the noise
    source inside the autograd function. The wrapper costs about 1 us of host time per call in eager steps; a CUDA
    graph replays none. The engines make one per layer and patch that same one in at every step, since dynamo
    guards on a patched forward's identity: a new one each step would retrace every compiled block each step."""
    if isinstance(base, nn.Conv2d):
        conv_args = (base.stride, base.padding, base.dilation, base.groups)

        def forward(x):
            return _NoisyConv2d.apply(x, base.weight, base.bias, source, conv_args)

    else:

        def forward(x):
            return _NoisyLinear.apply(x, base.weight, base.bias, source)

    return torch.compiler.disable(forward)
