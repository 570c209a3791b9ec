"""Sharpness of trained weights under Flat-LoRA's own noise law, for any torch model and any loss.

    sharpness(rho) = E_eps[ L(W' + eps) ] - L(W'),   eps_ij ~ N(0, rho^2 ||W'_i||^2 / n)

for every perturbed layer (W' = W + s*BA for a peft LoRA layer, the plain weight otherwise; n = fan-in). The
filter-wise relative radius is the law Flat-LoRA trains with, and it removes each row's scale, which plain
Gaussian sharpness does not (Dinh et al., 2017).

Why it is built on flat.FlatLoRA instead of its own perturbation code:
- one definition of the law (row std from the merged weight) for training and for measurement;
- the frozen weights are never written: each layer's forward computes with W + eps as a temporary, so
  nothing has to be "restored" and nothing can drift (fp16/bf16 add-then-subtract would);
- the draws come from a dedicated generator keyed by (seed, draw, layer name): draw k of layer L is the same
  standard normal for every run and every rho (common random numbers), and the global RNG is untouched.

By default each draw is an antithetic pair (W' + eps, W' - eps), see sharpness_curve.

Only torch and flat/ are imported, so this module works on any nn.Module with a loss closure.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..flat import (
    FlatLoRA,
    ReferenceNoise,
    find_lora_layers,
    noise_key,
    noisy_forward,
    patched_forwards,
    stable_id,
)

# Keeps evaluation draws apart from every training draw: training keys Flat-LoRA's noise by the run's seed,
# so an evaluation seed equal to it would otherwise replay the noise the run was trained against.
_EVAL_DOMAIN = 0xE7A1_5A4B


@dataclass(frozen=True)
class PlainLayer:
    """A Linear / Conv2d without LoRA, perturbed by the same law with W' = its weight.

    Offers the interface of flat.FlatLayer that FlatLoRA's perturbation reads (name, base, layer_id, fan_in,
    merged_weight), so plain models (and the known-answer test) go through the very same code path."""

    name: str
    base: nn.Module
    layer_id: int

    @property
    def fan_in(self) -> int:
        return self.base.weight[0].numel()

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight.detach().float()


def lora_layers(models: Sequence[nn.Module]) -> list:
    """Every peft LoRA Linear / Conv2d layer of `models`, named "<model index>.<path>" as in training."""
    return find_lora_layers(models)


def plain_layers(models: Sequence[nn.Module]) -> list[PlainLayer]:
    """Every zero-padded nn.Linear / nn.Conv2d of `models` (for models without LoRA)."""
    layers = []
    for index, model in enumerate(models):
        for path, module in model.named_modules():
            if type(module) is nn.Linear or (type(module) is nn.Conv2d and module.padding_mode == "zeros"
                                               and not isinstance(module.padding, str)):
                name = f"{index}.{path}"
                layers.append(PlainLayer(name=name, base=module, layer_id=stable_id(name)))
    return layers


def _engine(layers: Sequence, rho: float, seed: int) -> FlatLoRA:
    """A FlatLoRA that applies a constant sigma = rho to exactly `layers`, on the exact reference path (the fused
    CUDA path draws differently, and measurement must not depend on which kernels are installed)."""
    flat = FlatLoRA([], sigma=rho, schedule="constant", total_steps=1,
                    seed=noise_key(seed, _EVAL_DOMAIN, 0, 0, 0), process_rank=0, backend="reference")
    flat.layers = list(layers)
    return flat


@contextlib.contextmanager
def perturbed(layers: Sequence, rho: float, seed: int, draw: int, mirrored: bool = False) -> Iterator[None]:
    """Within the block every layer computes with W' + eps of draw `draw` (W' - eps when `mirrored`);
    afterwards exactly as before."""
    flat = _engine(layers, rho, seed)
    if not mirrored:
        with flat.perturb(draw):  # exactly the training code path
            yield
        return
    # -eps: the same keys with the row std negated (z * -s == -(z * s) exactly in IEEE arithmetic). FlatLoRA
    # refuses a negative sigma, so this patches the layers with the engine's public pieces instead.
    with patched_forwards() as patch:
        for layer in flat.layers:
            source = ReferenceNoise(layer.base.weight, flat.row_std(layer, -rho), flat.key(layer, draw))
            patch(layer.base, noisy_forward(layer.base, source))
        yield


@dataclass
class SharpnessPoint:
    rho: float
    mean_increase: float
    stderr: float | None  # over draws; None with a single draw
    worst_increase: float  # the largest single evaluation (either sign of a pair)
    mean_loss: float
    increases: list[float] = field(default_factory=list)  # per draw: pairs runs draw by draw (common numbers)


@dataclass
class SharpnessCurve:
    clean_loss: float
    draws: int
    antithetic: bool
    seed: int
    layers: int
    points: list[SharpnessPoint]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rho: float, clean: float, losses: Sequence[Sequence[float]]) -> SharpnessPoint:
    """Mean increase, its standard error over draws and the worst single evaluation (a cheap stand-in for SAM's
    max). `losses[k]` holds the loss(es) of draw k: one, or the antithetic pair, which counts as one draw."""
    increases = [math.fsum(pair) / len(pair) - clean for pair in losses]
    k = len(increases)
    mean = math.fsum(increases) / k
    stderr = None
    if k > 1:
        var = math.fsum((x - mean) ** 2 for x in increases) / (k - 1)
        stderr = math.sqrt(var / k)
    every = [loss for pair in losses for loss in pair]
    return SharpnessPoint(rho=float(rho), mean_increase=mean, stderr=stderr, worst_increase=max(every) - clean,
                          mean_loss=math.fsum(every) / len(every), increases=increases)


@torch.no_grad()
def sharpness_curve(
    loss_fn: Callable[[], float | torch.Tensor],
    layers: Iterable,
    rhos: Sequence[float],
    draws: int,
    seed: int = 0,
    clean_loss: float | None = None,
    antithetic: bool = True,
) -> SharpnessCurve:
    """The loss increase of `loss_fn` when `layers` are perturbed at each relative radius in `rhos`.

    `loss_fn` must be deterministic (fixed data, timesteps, noise): then draw k is the only thing that differs
    between the K evaluations of one rho, and between runs evaluated with the same seed.
    `antithetic`: each draw evaluates W' + eps and W' - eps and averages them. The first-order term g.eps has
    mean zero but, away from an exact minimum, dominates the variance of a single draw by orders of magnitude;
    the pair cancels it (and every odd term) exactly, leaving the curvature part that sharpness is about, at
    twice the cost per draw. The estimate stays unbiased: both halves follow the same law.
    `clean_loss`: L(W'), when the caller has computed it already."""
    layers = list(layers)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    clean = float(loss_fn()) if clean_loss is None else float(clean_loss)
    signs = (False, True) if antithetic else (False,)
    points = []
    for rho in rhos:
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        losses = []
        for k in range(draws):
            pair = []
            for mirrored in signs:
                with perturbed(layers, rho, seed, k, mirrored):
                    pair.append(float(loss_fn()))
            losses.append(pair)
        points.append(summarize(rho, clean, losses))
    return SharpnessCurve(clean_loss=clean, draws=draws, antithetic=antithetic, seed=seed, layers=len(layers),
                          points=points)
