"""The fused path's noise as torch ops: the keys and sigma_t of a step computed on the device, and the
counter-based generator (Philox-4x32 + Box-Muller) that the Triton kernels of fused_kernels.py implement.

This is the specification of the fused path's numbers: `FastFlat(kernels="torch")` runs on it (the CPU tests),
and the Triton kernels are checked against it (tests/test_flat_cuda.py in Triton's interpreter, and
benchmarks/bench_flat.py on the GPU).
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------------------
# keys: keys.noise_key, for many layers at once, on the device, from tensors
# ---------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def to_int64(x: int) -> int:
    """An unsigned 64-bit number as the int64 with the same bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = to_int64(0x9E3779B97F4A7C15)
_MIX1 = to_int64(0xBF58476D1CE4E5B9)
_MIX2 = to_int64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN  # int64 arithmetic wraps: the same bits as the unsigned computation of keys.splitmix64
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def device_noise_keys(seed, step, micro_step, layer_ids: torch.Tensor, rank) -> torch.Tensor:
    """keys.noise_key(seed, step, micro_step, layer_id, rank) for every entry of `layer_ids` (int64, the
    layer ids' bits), as an int64 tensor; seed / step / micro_step / rank may be ints or 0-d int64 tensors on
    the device of layer_ids. No host synchronisation."""
    key = torch.zeros((), dtype=torch.int64, device=layer_ids.device)
    for part in (seed, step, micro_step):
        key = _splitmix64(key ^ part)
    key = _splitmix64(key ^ layer_ids)
    key = _splitmix64(key ^ rank)
    return key & ((1 << 63) - 1)


def device_sigma_at(step: torch.Tensor, sigma: float, schedule: str, total_steps: int) -> torch.Tensor:
    """schedule.sigma_at as a device computation (float32 0-d tensor) from a step tensor."""
    if sigma == 0.0:
        return torch.zeros((), dtype=torch.float32, device=step.device)
    if schedule == "constant":
        return torch.full((), float(sigma), dtype=torch.float32, device=step.device)
    progress = (step.to(torch.float64).clamp(min=0) / max(int(total_steps), 1)).clamp(max=1.0)
    if schedule == "linear":
        return (progress * float(sigma)).float()
    return (float(sigma) * 0.5 * (1.0 - torch.cos(math.pi * progress))).float()


# ---------------------------------------------------------------------------------------------------------
# the generator: Philox-4x32 (Triton's tl.philox, reproduced bit for bit) + Box-Muller
# ---------------------------------------------------------------------------------------------------------
#
# Layout: element (row, col) of a layer's weight (rows = output channels, cols = the flattened fan-in) comes from
# the Philox call with counter (c0 = col // 8, c1 = row, 0, 0) and key (lo, hi) = the layer key's two 32-bit
# halves: its 4 output words w_p give the 8 consecutive columns 8 c0 .. 8 c0 + 7, one Box-Muller pair per word
# (col = 8 c0 + 2 p: r cos(theta), + 1: r sin(theta)). A word's top 20 bits j give the radius,
# u1 = 1 - (j + 0.5) / 2^20 in (0, 1), r = sqrt(-2 ln u1) <= 5.4; its low 12 bits a the angle,
# theta = (a + 0.5) 2 pi / 4096 - pi (4096 directions: the moments of cos and sin below order 4096 are exact).
# Why one word per pair (8 normals per call, not 4 from 24-bit uniforms): the noise pass is bound by the
# Philox rounds and the transcendental units, and a thread that makes 8 consecutive columns loads and stores
# them as 16-byte vectors (benchmarks/HISTORY.md). What it gives up: |z| is capped at 5.4 instead of
# 5.9 (a tail mass of 7e-8 per draw) and z takes a finite (20 x 12-bit) set of values, far finer than the
# bf16 rounding of W + eps (about sigma / 25 at sigma = 0.1).

PHILOX_ROUNDS = 10
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_TWO_PI = 6.283185307179586
_PI = 3.141592653589793
_INV_2_20 = 9.5367431640625e-07  # 2^-20
_ANGLE_STEP = _TWO_PI / 4096


def philox4x32(key: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32-`rounds` of counters (c0, c1, 0, 0) under a 64-bit key, in int64 tensors holding uint32
    values: the same numbers as Triton's tl.philox(key, c0, c1, 0, 0, rounds)."""
    k0 = key & _M32
    k1 = (key >> 32) & _M32
    c0 = c0.to(torch.int64)
    c1 = c1.to(torch.int64)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        p0 = c0 * _PHILOX_ROUND_A  # < 2^64: wraps in int64, but its two 32-bit halves are right
        p2 = c2 * _PHILOX_ROUND_B
        c0, c1, c2, c3 = (
            ((p2 >> 32) & _M32) ^ c1 ^ k0,
            p2 & _M32,
            ((p0 >> 32) & _M32) ^ c3 ^ k1,
            p0 & _M32,
        )
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _normal_pair(word: torch.Tensor):
    """The Box-Muller pair of one Philox word (int64 tensor of uint32 values), fp32 (layout above)."""
    u1 = 1.0 - ((word >> 12).to(torch.float32) + 0.5) * _INV_2_20
    theta = ((word & 0xFFF).to(torch.float32) + 0.5) * _ANGLE_STEP - _PI
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def standard_normal_grid(key, rows: int, cols: int, device=None, rounds: int = PHILOX_ROUNDS,
                         row_start: int = 0) -> torch.Tensor:
    """z (float32, rows x cols) of a layer with this key, in the layout above; rows row_start.. of the layer.
    `key` is an int or an int64 0-d tensor."""
    if not torch.is_tensor(key):
        key = torch.tensor(to_int64(int(key)), dtype=torch.int64, device=device)
    device = key.device
    calls = -(-cols // 8)
    c0 = torch.arange(calls, device=device, dtype=torch.int64).view(1, -1).expand(rows, -1)
    c1 = torch.arange(row_start, row_start + rows, device=device, dtype=torch.int64).view(-1, 1).expand(-1, calls)
    pairs = [torch.stack(_normal_pair(word), dim=-1) for word in philox4x32(key, c0, c1, rounds)]
    return torch.stack(pairs, dim=2).reshape(rows, calls * 8)[:, :cols].contiguous()  # rows, call, word, cos/sin
