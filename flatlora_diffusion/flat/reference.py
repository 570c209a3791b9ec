"""The exact reference path, the specification: eps of one layer at a time from a torch.Generator seeded with
the layer's key, scaled row by row, added to W in fp32 (used on the CPU, and with backend="reference")."""

from __future__ import annotations

from typing import Sequence

import torch

_generators: dict[torch.device, torch.Generator] = {}


def standard_normal(key: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """N(0, 1) float32 noise determined by `key` alone, from a generator that is not the global one."""
    device = torch.device(device)
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    gen.manual_seed(key)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def _perturbed_weight(weight: torch.Tensor, row_std: torch.Tensor, key: int, dtype: torch.dtype) -> torch.Tensor:
    """W + eps for one layer, as a temporary in `dtype`; the sum is formed in fp32 so eps is not lost to rounding.

    W is read in whatever dtype it is stored in at the time of the call, forward, backward or checkpoint
    recomputation alike: a float8 weight (--low_memory, or any hook that casts W back to its storage dtype after a
    forward) is upcast to fp32 exactly, so every call sees the same W + eps."""
    eps = standard_normal(key, weight.shape, weight.device)
    eps.mul_(row_std.view(-1, *([1] * (weight.dim() - 1))))
    return eps.add_(weight.float()).to(dtype)


class ReferenceNoise:
    """Where a perturbed layer gets W + eps from, on the reference path: one layer's generator key and row std.

    The fused engine (fused.py) supplies the same two methods from its per-chunk buffers; the autograd
    functions of perturbed_layers.py serve both.

    keep_for_backward: a forward whose input needs a gradient keeps its W + eps until backward asks for it, instead
    of drawing it again (the same tensor: every call of one step gives the same values). FlatLoRA turns it on for
    weights in CPU memory, where the second draw cost a third of Flat-LoRA's time per step (the toy world's demo)
    and the kept copies are small beside the models; on a GPU (--low_memory, backend "reference") memory is what
    counts, so it stays off there."""

    __slots__ = ("weight_tensor", "row_std", "key", "keep_for_backward", "_keep_next", "_kept")

    def __init__(self, weight: torch.Tensor, row_std: torch.Tensor, key: int, keep_for_backward: bool = False):
        self.weight_tensor, self.row_std, self.key = weight, row_std, key
        self.keep_for_backward = keep_for_backward
        self._keep_next = False  # the coming forward's W + eps is wanted again by its backward
        self._kept: torch.Tensor | None = None

    def restart(self, weight: torch.Tensor, row_std: torch.Tensor, key: int) -> None:
        """The same layer's draw at another step: FlatLoRA keeps one source (and the forward holding it) per layer."""
        self.weight_tensor, self.row_std, self.key = weight, row_std, key
        self.forget()

    def forget(self) -> None:
        """Drop a kept W + eps whose backward never came (a step ends; a forward without gradients)."""
        self._keep_next, self._kept = False, None

    def forward_seen(self, input_needs_grad: bool) -> None:
        """Told at each forward whether backward will need W + eps again."""
        self._keep_next = self.keep_for_backward and input_needs_grad

    def weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        kept = self._kept
        if backward and kept is not None and kept.dtype == dtype:
            self._kept = None  # a layer used twice in one step draws again for its second backward
            return kept
        w = _perturbed_weight(self.weight_tensor, self.row_std, self.key, dtype)
        if not backward and self._keep_next:
            self._kept = w
        return w
