"""FlatLoRA: the object a training loop holds. It finds the LoRA layers, knows the schedule and the seeds, and
perturbs the layers for one step, through the fused path (fused.py) on CUDA or the reference path otherwise."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from .keys import noise_key
from .layers import FlatLayer, find_lora_layers
from .perturbed_layers import noisy_forward, patched_forwards
from .reference import ReferenceNoise, standard_normal
from .schedule import SCHEDULES, sigma_at

BACKENDS = ("auto", "reference", "cuda")
_NOT_CHOSEN = object()


def _process_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class FlatLoRA:
    """Flat-LoRA for any peft LoRA model(s). Use in your own loop:

        flat = FlatLoRA([unet, text_encoder], sigma=0.1, schedule="cosine", total_steps=500, seed=0)
        for step, batch in enumerate(loader):
            with flat.perturb(step):          # W + eps for this step's forward AND backward
                loss = compute_loss(batch)
                loss.backward()
            optimizer.step(); optimizer.zero_grad()

    Call backward inside the `with` block: gradient-checkpoint recomputation happens during backward and
    must see the same perturbed layers.

    per_microbatch=False (default, as the official code): every `perturb(step)` of one step draws the same
    eps, so the micro-batches of gradient accumulation share it. True: each `perturb` call of a step draws
    fresh noise (micro_step counted automatically, or passed explicitly).
    share_noise_across_ranks=False (default): under DDP each process draws its own eps (more samples of the
    expectation per step at no cost); True: every rank uses rank 0's draw. `step` must be the global
    optimizer step, identical on all ranks, so the schedule is not stretched by the world size.
    """

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        sigma: float = 0.1,
        schedule: str = "cosine",
        total_steps: int = 1000,
        seed: int = 0,
        per_microbatch: bool = False,
        share_noise_across_ranks: bool = False,
        process_rank: int | None = None,
        backend: str = "auto",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown Flat-LoRA backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if sigma < 0 or not math.isfinite(sigma):
            raise ValueError(f"Flat-LoRA sigma must be a finite number >= 0, got {sigma}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown Flat-LoRA schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.sigma = float(sigma)
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.per_microbatch = per_microbatch
        self.share_noise_across_ranks = share_noise_across_ranks
        self._rank = process_rank
        self.layers = find_lora_layers(self.models)
        self._micro_counter: tuple[int, int] = (-1, 0)  # (step, next micro index) for per_microbatch
        self.active = False
        self.backend = backend
        self._fast = _NOT_CHOSEN  # the fused engine (fused.FastFlat) or None, chosen at the first step
        self._reference_forwards: dict[int, tuple] = {}  # layer index -> (ReferenceNoise, its perturbed forward)

    def fast_engine(self):
        """The fused engine of backend auto/cuda (fused.FastFlat), or None when this is the reference path.
        Chosen on first use, so the models may move to the GPU after FlatLoRA is built."""
        if self._fast is _NOT_CHOSEN:
            from . import fused  # imports Triton when it is installed: only when a step needs it

            self._fast = fused.engine_for(self, self.backend)
        return self._fast

    # --- schedule and keys -------------------------------------------------------------------------------
    def sigma_at(self, step: int) -> float:
        return sigma_at(step, self.sigma, self.schedule, self.total_steps)

    @property
    def rank(self) -> int:
        if self.share_noise_across_ranks:
            return 0
        return _process_rank() if self._rank is None else self._rank

    def key(self, layer: FlatLayer, step: int, micro_step: int = 0) -> int:
        return noise_key(self.seed, step, micro_step if self.per_microbatch else 0, layer.layer_id, self.rank)

    def _next_micro_step(self, step: int) -> int:
        last_step, nxt = self._micro_counter
        micro = nxt if last_step == step else 0
        self._micro_counter = (step, micro + 1)
        return micro

    # --- noise ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def row_std(self, layer: FlatLayer, sigma_t: float) -> torch.Tensor:
        """Per output row: sigma_t * ||W'_i|| / sqrt(fan-in), fp32, no gradient."""
        merged = layer.merged_weight()
        norms = merged.reshape(merged.shape[0], -1).norm(dim=1)
        return norms.mul_(sigma_t / math.sqrt(layer.fan_in))

    @torch.no_grad()
    def noise(self, layer: FlatLayer | str, step: int, micro_step: int = 0) -> torch.Tensor:
        """The eps (fp32) that `layer` gets at `step` given the current weights; for inspection and tests."""
        if isinstance(layer, str):
            layer = next(lay for lay in self.layers if lay.name == layer)
        if self.fast_engine() is not None:
            return self._fast.noise(layer, step, micro_step)
        std = self.row_std(layer, self.sigma_at(step))
        eps = standard_normal(self.key(layer, step, micro_step), layer.base.weight.shape, layer.base.weight.device)
        return eps.mul_(std.view(-1, *([1] * (eps.dim() - 1))))

    # --- the step --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def perturb(self, step: int, micro_step: int | None = None) -> Iterator[float]:
        """Within the block every LoRA layer computes with W + eps; yields sigma_t. Re-entrance is an error."""
        if self.fast_engine() is not None:
            with self._fast.perturb(step, micro_step) as sigma_t:
                yield sigma_t
            return
        if self.active:
            raise RuntimeError("FlatLoRA.perturb is already active; nested perturbation is not supported")
        sigma_t = self.sigma_at(step)
        if sigma_t == 0.0 or not self.layers:
            yield sigma_t
            return
        if micro_step is None:
            micro_step = self._next_micro_step(step) if self.per_microbatch else 0
        self.active = True
        sources = []
        try:
            with patched_forwards() as patch:
                for index, layer in enumerate(self.layers):
                    source, forward = self._reference_forward(index, layer)
                    source.restart(layer.base.weight, self.row_std(layer, sigma_t), self.key(layer, step, micro_step))
                    sources.append(source)
                    patch(layer.base, forward)
                yield sigma_t
        finally:
            for source in sources:
                source.forget()
            self.active = False

    def _reference_forward(self, index: int, layer: FlatLayer) -> tuple:
        """(noise source, perturbed forward) of a layer on the reference path, made at its first step and kept: the
        patched forward is one object for this FlatLoRA's life (noisy_forward says why)."""
        entry = self._reference_forwards.get(index)
        if entry is None:
            weight = layer.base.weight
            source = ReferenceNoise(weight, None, 0, keep_for_backward=weight.device.type == "cpu")
            entry = self._reference_forwards[index] = (source, noisy_forward(layer.base, source))
        return entry
