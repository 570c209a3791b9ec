"""Flat-LoRA engine: exact, seeded, filter-wise random weight perturbation for peft LoRA models.

During a training step every peft LoRA Linear / Conv2d layer computes with W + eps instead of W, where

    eps_ij ~ N(0, sigma_t^2 * ||W'_i||^2 / n),   W' = W + sum_adapters scaling * B @ A,   n = fan-in,

so LoRA's A and B receive gradients taken at a randomly perturbed point of the *full* weight space, which
steers them toward flat minima (Flat-LoRA, ICML 2025, arXiv 2409.14396).

What this implementation guarantees, and why it is built the way it is:
- Exact. The frozen weight is never written. The perturbed layer runs through a custom autograd function
  that materialises W + eps for one layer at a time, and regenerates eps from its seed in backward (and in
  gradient-checkpoint recomputation). The reference code adds and later subtracts eps in place, which in
  bf16/fp16 leaves the base model drifted.
- Seeded. eps depends only on (seed, step, micro-batch, layer name, process rank) through a dedicated
  torch.Generator; the global RNG is never touched, so a LoRA run and a Flat-LoRA run with one seed see
  identical diffusion noise, timesteps and data order.
- Cheap in memory. What autograd keeps is a reference to W (already resident) and one std vector per layer;
  no copy of the perturbed weights.
- sigma_t = 0 (sigma = 0, or the first step of the increasing schedules) patches nothing: plain LoRA, bit
  for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")
BACKENDS = ("auto", "reference", "cuda")
_MASK64 = (1 << 64) - 1


def sigma_at(step: int, sigma: float, schedule: str = "cosine", total_steps: int = 1) -> float:
    """sigma_t at a global optimizer step (0-based).

    cosine: sigma * (1 - cos(pi t / T)) / 2, the increasing schedule of the official code; linear: sigma * t/T;
    constant: sigma. Past T the value stays at sigma.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown Flat-LoRA schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if sigma == 0.0:
        return 0.0
    if schedule == "constant":
        return float(sigma)
    progress = min(max(step, 0) / max(int(total_steps), 1), 1.0)
    if schedule == "linear":
        return float(sigma) * progress
    return float(sigma) * 0.5 * (1.0 - math.cos(math.pi * progress))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(seed: int, step: int, micro_step: int, layer_id: int, rank: int) -> int:
    """A 63-bit generator seed that changes with every argument (well mixed, so neighbours are unrelated)."""
    key = 0
    for part in (seed, step, micro_step, layer_id, rank):
        key = _splitmix64(key ^ (int(part) & _MASK64))
    return key & ((1 << 63) - 1)


def _stable_id(text: str) -> int:
    """A 64-bit id of a layer name that is the same in every process and Python run (hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_generators: dict[torch.device, torch.Generator] = {}


def standard_normal(key: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """N(0, 1) float32 noise determined by `key` alone, from a generator that is not the global one."""
    device = torch.device(device)
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    gen.manual_seed(key)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the un-perturbed layer would compute in: autocast's when it is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _perturbed_weight(weight: torch.Tensor, row_std: torch.Tensor, key: int, dtype: torch.dtype) -> torch.Tensor:
    """W + eps for one layer, as a temporary in `dtype`; the sum is formed in fp32 so eps is not lost to rounding."""
    eps = standard_normal(key, weight.shape, weight.device)
    eps.mul_(row_std.view(-1, *([1] * (weight.dim() - 1))))
    return eps.add_(weight.float()).to(dtype)


class ReferenceNoise:
    """Where a perturbed layer gets W + eps from, on the reference path: one layer's generator key and row std.

    The fast engine (flat_cuda) supplies the same two methods from its fused, per-block buffers; the autograd
    functions below are shared by both engines."""

    __slots__ = ("weight_tensor", "row_std", "key")

    def __init__(self, weight: torch.Tensor, row_std: torch.Tensor, key: int):
        self.weight_tensor, self.row_std, self.key = weight, row_std, key

    def forward_seen(self, input_needs_grad: bool) -> None:
        """Told at each forward whether backward will need W + eps again (the fast engine uses it)."""

    def weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        return _perturbed_weight(self.weight_tensor, self.row_std, self.key, dtype)


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
        return out

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
    that `source` (ReferenceNoise, or the fast engine's equivalent) provides."""
    if isinstance(base, nn.Conv2d):
        conv_args = (base.stride, base.padding, base.dilation, base.groups)

        def forward(x):
            return _NoisyConv2d.apply(x, base.weight, base.bias, source, conv_args)

    else:

        def forward(x):
            return _NoisyLinear.apply(x, base.weight, base.bias, source)

    return forward


@dataclass(frozen=True)
class FlatLayer:
    """One perturbed layer: the peft LoRA layer, its innermost frozen base layer, and its noise identity."""

    name: str  # "<model index>.<module path>", unique across the models handed to FlatLoRA
    lora_layer: nn.Module
    base: nn.Module
    layer_id: int

    @property
    def fan_in(self) -> int:
        return self.base.weight[0].numel()

    def merged_weight(self) -> torch.Tensor:
        """W' = W + sum of the active adapters' scaling * B @ A, in fp32 (what the noise scale is taken from)."""
        layer = self.lora_layer
        weight = self.base.weight.detach().float()
        if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
            return weight  # merged adapters are already inside W; disabled ones contribute nothing
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).detach().float()
        return weight


def find_lora_layers(models: Iterable[nn.Module]) -> list[FlatLayer]:
    """Every peft LoRA Linear/Conv2d layer in `models` (deduplicated), in a stable order."""
    from peft.tuners.lora.layer import LoraLayer

    layers: list[FlatLayer] = []
    seen: set[int] = set()
    for model_index, model in enumerate(models):
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or id(module) in seen:
                continue
            base = module.get_base_layer()
            if type(base) not in (nn.Linear, nn.Conv2d):
                continue  # embeddings, Conv1d/3d, quantised layers: Flat-LoRA perturbs Linear and Conv2d only
            if isinstance(base, nn.Conv2d) and (base.padding_mode != "zeros" or isinstance(base.padding, str)):
                raise ValueError(
                    f"Flat-LoRA supports zero-padded Conv2d with numeric padding; {module_name} has "
                    f"padding={base.padding!r}, padding_mode={base.padding_mode!r}"
                )
            seen.add(id(module))
            name = f"{model_index}.{module_name}"
            layers.append(FlatLayer(name=name, lora_layer=module, base=base, layer_id=_stable_id(name)))
    return layers


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
        self._fast = _MISSING  # the fast engine (flat_cuda.FastFlat) or None, chosen at the first step

    def fast_engine(self):
        """The fast engine of backend auto/cuda (flat_cuda.FastFlat), or None when this is the reference path.
        Chosen on first use, so the models may move to the GPU after FlatLoRA is built."""
        if self._fast is _MISSING:
            from . import flat_cuda

            self._fast = flat_cuda.engine_for(self, self.backend)
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
        try:
            with patched_forwards() as patch:
                for layer in self.layers:
                    std = self.row_std(layer, sigma_t)
                    key = self.key(layer, step, micro_step)
                    patch(layer.base, noisy_forward(layer.base, ReferenceNoise(layer.base.weight, std, key)))
                yield sigma_t
        finally:
            self.active = False


_MISSING = object()
