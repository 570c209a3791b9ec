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

The package, bottom to top (each file imports only those above it; nothing here knows diffusers or the trainer):
    schedule.py          sigma_t over the run
    keys.py              the seed of one layer's noise at one step
    layers.py            the perturbed layers (peft LoRA Linear / Conv2d) and their merged weight W'
    perturbed_layers.py  a frozen layer computing with W + eps from a noise source, in forward and backward
    reference.py         the reference path: eps from torch.Generator, one layer at a time (the specification)
    fused_torch.py       the fused path's keys, sigma_t and Philox generator as torch ops (runs anywhere)
    fused_kernels.py     the fused path's Triton kernels
    fused_chunks.py      which layers share one launch of the fused path
    fused.py             the fused path's engine (FastFlat): a few launches per step, CUDA-graph capturable
    flat_lora.py         FlatLoRA, the public object: chooses the path
"""

from .flat_lora import BACKENDS, FlatLoRA
from .keys import noise_key, stable_id
from .layers import FlatLayer, find_lora_layers
from .perturbed_layers import noisy_forward, patched_forwards
from .reference import ReferenceNoise, standard_normal
from .schedule import SCHEDULES, sigma_at

__all__ = [
    "BACKENDS",
    "SCHEDULES",
    "FlatLayer",
    "FlatLoRA",
    "ReferenceNoise",
    "find_lora_layers",
    "noise_key",
    "noisy_forward",
    "patched_forwards",
    "sigma_at",
    "stable_id",
    "standard_normal",
]
