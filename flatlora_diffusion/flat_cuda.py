"""Fast Flat-LoRA engine for CUDA: the same perturbation as `flat.py`, in a few fused launches per step.

`flat.FlatLoRA(..., backend="auto")` uses this engine when its layers live on a CUDA device and Triton is
importable; `backend="reference"` keeps the per-layer torch path of flat.py, the specification.

What is the same as the reference path (checked on the CPU by tests/test_flat.py, whose specification runs
against both engines, with the fast-only checks in tests/test_flat_cuda.py; on the GPU by benchmarks/bench_flat.py):
- the law of eps: eps_ij = std_i * z_ij, std_i = sigma_t * ||W'_i|| / sqrt(fan-in), W' = W + s B A,
  z i.i.d. N(0, 1), no gradient through std;
- the key of a layer's noise: flat.noise_key(seed, step, micro, layer id, rank), here computed on the device
  for all layers at once (`device_noise_keys`), so a captured CUDA graph replays with a new step;
- exactness: the frozen weights are never written; W + eps is a temporary, regenerated from (key, std) in
  backward and in gradient-checkpoint recomputation, so they see the same eps as the forward;
- the gradients of A and B are those of the fp32 computation with W + eps materialised.

What differs: z comes from a counter-based generator (Philox-4x32 keyed by the layer key, counter = position
in the weight, Box-Muller), not from torch.Generator, so the draws are other numbers of the same law.

How it is fast:
- Layers are grouped in chunks: consecutive transformer blocks (the layers whose names share the prefix before
  "attn1.to_q", "self_attn.q_proj", ...) of one family (names equal but for their numbers: the blocks of the
  down path, of the up path, the layers of a text encoder), up to max_chunk_numel elements and the size of the
  largest block; an SDXL 1280-wide block is a chunk of its own, two 640-wide ones share one. At the start of a
  step one Triton launch computes the keys of all layers, one A A^T of every layer and one the noise scales of
  all rows of all layers, from ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2 (s b_i).(W_i A^T) + (s b_i) A A^T (s b_i)^T:
  ||W_i||^2 is cached (W is frozen), so the step reads W once for W A^T on tensor cores and never forms B A.
  Then one launch per chunk writes W + eps for all its layers into one temporary buffer in the compute dtype
  (W loaded and W + eps stored with evict-first cache hints, so the step's activations stay in L2);
  the layers run cuBLAS on views of it. The buffer of the last chunk used is kept until another chunk is asked
  for, so a chunk's forward is one launch, its backward one launch, and the gradient-checkpoint recomputation
  of its blocks shares its launch with their backward. Extra memory: one chunk's temporary (<= the largest
  block), the noise scales and cached row norms (2 x 4 bytes per row) and A A^T (1 KiB per layer at rank 16).
- Where every fan-in is a multiple of 16 and the tensors 16-byte aligned (all SD / SDXL attention layers), the
  kernels are told so (ALIGNED) and load and store 16 bytes at a time.
- Seed, step, micro-batch and sigma_t are device tensors; nothing in the step reads them on the host, so the
  step can be captured in a CUDA graph (`GraphedTrainStep`) with Flat-LoRA inside.

`kernels="torch"` runs the same algorithm with torch ops (a bit-exact emulation of the Philox generator):
it is what the CPU tests exercise, and what the GPU benchmark compares the Triton kernel against.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import nn

from .flat import FlatLayer, FlatLoRA, noisy_forward, patched_forwards

# ---------------------------------------------------------------------------------------------------------
# keys: flat.noise_key, for many layers at once, on the device, from tensors
# ---------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _i64(x: int) -> int:
    """An unsigned 64-bit number as the int64 with the same bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN  # int64 arithmetic wraps: the same bits as the unsigned computation of flat._splitmix64
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def device_noise_keys(seed, step, micro_step, layer_ids: torch.Tensor, rank) -> torch.Tensor:
    """flat.noise_key(seed, step, micro_step, layer_id, rank) for every entry of `layer_ids` (int64, the
    layer ids' bits), as an int64 tensor; seed / step / micro_step / rank may be ints or 0-d int64 tensors on
    the device of layer_ids. No host synchronisation."""
    key = torch.zeros((), dtype=torch.int64, device=layer_ids.device)
    for part in (seed, step, micro_step):
        key = _splitmix64(key ^ part)
    key = _splitmix64(key ^ layer_ids)
    key = _splitmix64(key ^ rank)
    return key & ((1 << 63) - 1)


def device_sigma_at(step: torch.Tensor, sigma: float, schedule: str, total_steps: int) -> torch.Tensor:
    """flat.sigma_at as a device computation (float32 0-d tensor) from a step tensor."""
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
# them as 16-byte vectors (benchmarks/results/rng_kernels/). What it gives up: |z| is capped at 5.4 instead of
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
        key = torch.tensor(_i64(int(key)), dtype=torch.int64, device=device)
    device = key.device
    calls = -(-cols // 8)
    c0 = torch.arange(calls, device=device, dtype=torch.int64).view(1, -1).expand(rows, -1)
    c1 = torch.arange(row_start, row_start + rows, device=device, dtype=torch.int64).view(-1, 1).expand(-1, calls)
    pairs = [torch.stack(_normal_pair(word), dim=-1) for word in philox4x32(key, c0, c1, rounds)]
    return torch.stack(pairs, dim=2).reshape(rows, calls * 8)[:, :cols].contiguous()  # rows, call, word, cos/sin


# ---------------------------------------------------------------------------------------------------------
# the Triton kernel (built on first use; Triton is imported only then)
# ---------------------------------------------------------------------------------------------------------

try:  # Triton is optional: the CPU path (kernels="torch") and the reference path do not need it
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older layouts
        from triton.language.extra.cuda import libdevice
except Exception:  # pragma: no cover - no Triton on this machine
    triton = None


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _normal_pair_tl(word, FAST: tl.constexpr):
        """The Box-Muller pair of one Philox word (layout above). FAST: the uniforms made with integer ops
        (I2F runs on the quarter-rate unit the transcendentals need: mantissa bits under 1.0's exponent give
        1 + x exactly; u1 is the same number as the emulation's) and fast lg2 / cos / sin."""
        if FAST:
            u1 = 1.9999995231628418 - ((word >> 12) << 3 | 0x3F800000).to(tl.float32, bitcast=True)  # 2 - 2^-21
            g = ((word & 0xFFF) << 11 | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + a / 4096
            theta = g * 6.283185307179586 - 9.424010970375436  # - 3 pi + pi / 4096
            r = tl.sqrt(-1.3862943611198906 * libdevice.fast_log2f(u1))
            return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
        u1 = 1.0 - ((word >> 12).to(tl.float32) + 0.5) * 9.5367431640625e-07
        theta = ((word & 0xFFF).to(tl.float32) + 0.5) * 0.0015339807878856412 - 3.141592653589793
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(theta), r * tl.sin(theta)

    @triton.jit
    def _noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base,
                    ADD_W: tl.constexpr, ROUNDS: tl.constexpr, FAST: tl.constexpr, EVICT_FIRST: tl.constexpr):
        """Columns c0 .. c0 + 8 T - 1 of the program's rows as a [rows, T calls, 8] tile: one Philox call per
        thread and 8 consecutive columns (16-byte loads and stores with ALIGNED). W is loaded before the Philox
        rounds, so its latency hides behind the arithmetic. EVICT_FIRST: W is loaded and W + eps stored with
        evict-first hints, so the chunk (up to 60 MB through the 50 MB L2) does not push the step's activations
        out of L2 (without them the step's own small kernels ran ~0.3 ms slower per SDXL step)."""
        cols = c0 + 8 * t[None, :, None] + j[None, None, :]
        off = rows64[:, None, None] * K + cols
        msk = rmask[:, None, None] & (cols < K)
        if ADD_W:
            w = tl.load(w_base + off, mask=msk, other=0.0, eviction_policy="evict_first" if EVICT_FIRST else "")
            w = w.to(tl.float32)
        ctr0 = (c0 // 8 + t).to(tl.uint32)[None, :] + zero
        i1, i2, i3, i4 = tl.philox(key, ctr0, ctr1, zero, zero, ROUNDS)
        a1, b1 = _normal_pair_tl(i1, FAST)
        a2, b2 = _normal_pair_tl(i2, FAST)
        a3, b3 = _normal_pair_tl(i3, FAST)
        a4, b4 = _normal_pair_tl(i4, FAST)
        # join stacks along a new minor dimension: [rows, T, m, n, k] -> column 4 m + 2 n + k of the call =
        # word 2 m + n, cos (k = 0) or sin: the layout above (in registers, no shared memory in the PTX)
        z = tl.join(tl.join(tl.join(a1, a3), tl.join(a2, a4)), tl.join(tl.join(b1, b3), tl.join(b2, b4)))
        v = std[:, None, None] * tl.reshape(z, (z.shape[0], z.shape[1], 8))
        if ADD_W:
            v = v + w
        tl.store(out_base + off, v.to(out_base.dtype.element_ty), mask=msk, cache_modifier=".cs" if EVICT_FIRST else "")

    @triton.jit
    def _fan_in(m, ALIGNED: tl.constexpr):
        """The fan-in K from a layer's meta row. ALIGNED (the host checked it for every layer of the launch):
        K is a multiple of 16 and the layer's W, A and output 16-byte aligned, so each row starts on a 16-byte
        boundary and the compiler vectorises the loads and stores (values loaded from a table carry no
        alignment otherwise: scalar 2-byte accesses). The hints must sit where the value is made (a load, a
        cast): on a function argument they are silently dropped."""
        K = tl.load(m + 3)
        if ALIGNED:
            K = tl.multiple_of(K, 16)
        return K

    @triton.jit
    def _meta_pointer(m, col: tl.constexpr, T: tl.constexpr, ALIGNED: tl.constexpr):
        """The address in column `col` of a layer's meta row as a pointer to T (16-byte aligned with ALIGNED)."""
        ptr = tl.load(m + col).to(tl.pointer_type(T))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _program_rows(prog_ptr, pid, PROG_COLS: tl.constexpr, meta_ptr, keys_ptr, out_ptr, W_T: tl.constexpr,
                      BM: tl.constexpr, ALIGNED: tl.constexpr = False):
        """What a noise program reads from its row of the program table (layer, first row, ...) and the
        layer's row of the meta table: the meta row, fan-in K, W and output bases, noise key, and its BM rows
        (with the mask of those inside the layer)."""
        lay = tl.load(prog_ptr + PROG_COLS * pid)
        r0 = tl.load(prog_ptr + PROG_COLS * pid + 1)
        m = meta_ptr + lay.to(tl.int64) * 9
        K = _fan_in(m, ALIGNED)
        n_rows = tl.load(m + 8)
        w_base = _meta_pointer(m, 0, W_T, ALIGNED)
        out_offset = tl.load(m + 5)
        if ALIGNED:
            out_offset = tl.multiple_of(out_offset, 16)
        out_base = out_ptr + out_offset
        key = tl.load(keys_ptr + tl.load(m + 7))
        rows = r0 + tl.arange(0, BM)
        rmask = rows < n_rows
        return m, K, w_base, out_base, key, rows, rmask, rows.to(tl.int64)

    @triton.jit
    def flat_noise_kernel(
        prog_ptr,  # int32 [P, 2]: layer (row of meta), first row
        meta_ptr,  # int64 [L, 9]: W addr, A addr, B addr, K, R, out offset, std offset, key index, rows
        keys_ptr,  # int64 [n layers of the engine]
        std_ptr,  # fp32 [total rows]
        out_ptr,  # the chunk's output buffer (compute dtype)
        W_T: tl.constexpr,
        ADD_W: tl.constexpr,
        BM: tl.constexpr,
        T: tl.constexpr,  # Philox calls per row and iteration (8 T columns)
        ROUNDS: tl.constexpr,
        FAST: tl.constexpr,
        WHILE_LOOPS: tl.constexpr,  # the interpreter cannot run range() over a loaded bound
        ALIGNED: tl.constexpr = False,  # see _fan_in
        EVICT_FIRST: tl.constexpr = False,  # see _noise_tile
    ):
        """out[rows, :] = W + std_row * z (ADD_W) or std_row * z, for BM rows of one layer, all columns.
        Few rows per program and a loop over the columns: many small programs per multiprocessor keep the
        memory system busy while others run Philox rounds (benchmarks/noise_kernel_sweep.py: 4 rows x 32 calls
        of 8 columns, 4 warps, was the fastest of the shapes tried for this layout)."""
        m, K, w_base, out_base, key, rows, rmask, rows64 = _program_rows(
            prog_ptr, tl.program_id(0), 2, meta_ptr, keys_ptr, out_ptr, W_T, BM, ALIGNED)
        std = tl.load(std_ptr + tl.load(m + 6) + rows64, mask=rmask, other=0.0)
        t = tl.arange(0, T)
        j = tl.arange(0, 8)
        zero = tl.zeros((BM, T), dtype=tl.uint32)
        ctr1 = rows.to(tl.uint32)[:, None] + zero
        if WHILE_LOOPS:
            c0 = K * 0
            while c0 < K:
                _noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, ADD_W, ROUNDS, FAST,
                            EVICT_FIRST)
                c0 += 8 * T
        else:
            for c0 in range(0, K, 8 * T):
                _noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, ADD_W, ROUNDS, FAST,
                            EVICT_FIRST)

    @triton.jit
    def _gram_tile(k0, K, rr64, rmask_r, a_base, g, BK: tl.constexpr, PRECISION: tl.constexpr):
        """G += A[:, k0:k0+BK] A[:, k0:k0+BK]^T, A^T loaded as a second [BK, RP] tile (no transpose in registers)."""
        cols = k0 + tl.arange(0, BK)
        cm = cols < K
        a = tl.load(a_base + rr64[:, None] * K + cols[None, :], mask=rmask_r[:, None] & cm[None, :], other=0.0)
        at = tl.load(a_base + rr64[None, :] * K + cols[:, None], mask=cm[:, None] & rmask_r[None, :], other=0.0)
        return tl.dot(a.to(tl.float32), at.to(tl.float32), g, input_precision=PRECISION)

    @triton.jit
    def flat_gram_kernel(
        layers_ptr,  # int32 [n]: the layers (rows of meta) of this launch, one per program
        meta_ptr,  # int64 [L, 9] as above
        gram_ptr,  # fp32 [L, RP, RP], written: A A^T of each layer
        AB_T: tl.constexpr,
        RP: tl.constexpr,
        BK: tl.constexpr,
        PRECISION: tl.constexpr,  # "tf32x3" on the GPU (~fp32; plain tf32 errs by 7e-4), "ieee" interpreted
        WHILE_LOOPS: tl.constexpr,
        ALIGNED: tl.constexpr = False,
    ):
        """G = A A^T (RP x RP, zero-padded) of one layer per program: the (s B A)_i (s B A)_i^T term of the noise
        scale is then (s b_i) G (s b_i)^T, without forming B A."""
        lay = tl.load(layers_ptr + tl.program_id(0)).to(tl.int64)
        m = meta_ptr + lay * 9
        K = _fan_in(m, ALIGNED)
        a_base = _meta_pointer(m, 1, AB_T, ALIGNED)
        rr = tl.arange(0, RP)
        rmask_r = rr < tl.load(m + 4)
        rr64 = rr.to(tl.int64)
        g = tl.zeros((RP, RP), dtype=tl.float32)
        if WHILE_LOOPS:
            k0 = K * 0
            while k0 < K:
                g = _gram_tile(k0, K, rr64, rmask_r, a_base, g, BK, PRECISION)
                k0 += BK
        else:
            for k0 in range(0, K, BK):
                g = _gram_tile(k0, K, rr64, rmask_r, a_base, g, BK, PRECISION)
        tl.store(gram_ptr + lay * RP * RP + rr[:, None] * RP + rr[None, :], g)

    @triton.jit
    def _wa_tile(k0, K, rows64, rmask, rr64, rmask_r, w_base, a_base, acc, BK: tl.constexpr,
                 SPLIT_BF16: tl.constexpr, EVICT_FIRST: tl.constexpr):
        """acc += W[rows, k0:k0+BK] A[:, k0:k0+BK]^T on tensor cores. SPLIT_BF16 (W in bf16): A = A_hi + A_lo,
        both bf16, two bf16 dots (W exact, A to ~16 bits); else one tf32 dot. EVICT_FIRST: W, read once per step,
        is loaded under an L2 evict-first policy (see _noise_tile)."""
        cols = k0 + tl.arange(0, BK)
        cm = cols < K
        w = tl.load(w_base + rows64[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0,
                    eviction_policy="evict_first" if EVICT_FIRST else "")
        at = tl.load(a_base + rr64[None, :] * K + cols[:, None], mask=cm[:, None] & rmask_r[None, :],
                     other=0.0).to(tl.float32)
        if SPLIT_BF16:
            hi = at.to(tl.bfloat16)
            acc = tl.dot(w, hi, acc)
            acc = tl.dot(w, (at - hi.to(tl.float32)).to(tl.bfloat16), acc)
        else:
            acc = tl.dot(w.to(tl.float32), at, acc, input_precision="tf32")
        return acc

    @triton.jit
    def _norm_program_rows(prog_ptr, meta_ptr, scale_ptr, W_T: tl.constexpr, AB_T: tl.constexpr, BM: tl.constexpr,
                           RP: tl.constexpr, ALIGNED: tl.constexpr = False):
        """What a noise-scale program reads from its row of the program table (layer, first row) and the layer's
        meta row: fan-in K, rank R, W / A / B bases, scaling s, its BM rows and the RP-padded rank index, with
        masks."""
        pid = tl.program_id(0)
        lay = tl.load(prog_ptr + 2 * pid)
        m = meta_ptr + lay.to(tl.int64) * 9
        R = tl.load(m + 4)
        rows = tl.load(prog_ptr + 2 * pid + 1) + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        K = _fan_in(m, ALIGNED)
        w_base = _meta_pointer(m, 0, W_T, ALIGNED)
        a_base = _meta_pointer(m, 1, AB_T, ALIGNED)
        b_base = tl.load(m + 2).to(tl.pointer_type(AB_T))
        return (m, K, R, w_base, a_base, b_base, tl.load(scale_ptr + lay), rows.to(tl.int64),
                rows < tl.load(m + 8), rr, rr < R)

    @triton.jit
    def flat_norm_kernel(
        prog_ptr,  # int32 [P, 2]: layer (row of meta), first row
        meta_ptr,  # int64 [L, 9] as above
        scale_ptr,  # fp32 [L]: LoRA scaling s
        sigma_ptr,  # fp32 [1]: sigma_t
        wsq_ptr,  # fp32 [total rows]: ||W_i||^2 (W is frozen: computed when a weight changes, FastFlat._refresh)
        gram_ptr,  # fp32 [L, RP, RP]: A A^T (flat_gram_kernel, this step)
        std_ptr,  # fp32 [total rows], written
        W_T: tl.constexpr,
        AB_T: tl.constexpr,
        BM: tl.constexpr,
        BK: tl.constexpr,
        RP: tl.constexpr,
        WHILE_LOOPS: tl.constexpr,  # the interpreter cannot run range() over a loaded bound
        ALIGNED: tl.constexpr = False,  # every fan-in a multiple of 16, W and A 16-byte aligned (see _fan_in)
        SPLIT_BF16: tl.constexpr = False,  # see _wa_tile (W in bf16; Triton's interpreter cannot run it)
        EVICT_FIRST: tl.constexpr = False,  # see _wa_tile
    ):
        """std_row = sigma_t * ||W_i + s (B A)_i|| / sqrt(K) for BM rows of one layer, from the expansion
        ||W_i||^2 + 2 (s b_i).(W_i A^T) + (s b_i) G (s b_i)^T: the loop only forms W A^T (a BM x RP accumulator
        on tensor cores) and reads W once at the memory's speed; never B A, never out x in in memory."""
        m, K, R, w_base, a_base, b_base, s, rows64, rmask, rr, rmask_r = _norm_program_rows(
            prog_ptr, meta_ptr, scale_ptr, W_T, AB_T, BM, RP, ALIGNED)
        lay = tl.load(prog_ptr + 2 * tl.program_id(0)).to(tl.int64)
        rr64 = rr.to(tl.int64)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        if WHILE_LOOPS:
            k0 = K * 0
            while k0 < K:
                acc = _wa_tile(k0, K, rows64, rmask, rr64, rmask_r, w_base, a_base, acc, BK, SPLIT_BF16, EVICT_FIRST)
                k0 += BK
        else:
            for k0 in range(0, K, BK):
                acc = _wa_tile(k0, K, rows64, rmask, rr64, rmask_r, w_base, a_base, acc, BK, SPLIT_BF16, EVICT_FIRST)
        b = tl.load(b_base + rows64[:, None] * R + rr[None, :], mask=rmask[:, None] & rmask_r[None, :], other=0.0)
        b = b.to(tl.float32) * s
        g = tl.load(gram_ptr + lay * RP * RP + rr[:, None] * RP + rr[None, :])
        bg = tl.dot(b, g, input_precision="ieee")
        std_rows = tl.load(m + 6) + rows64
        norm2 = (tl.load(wsq_ptr + std_rows, mask=rmask, other=0.0) + 2.0 * tl.sum(b * acc, axis=1)
                 + tl.sum(bg * b, axis=1))
        std = tl.load(sigma_ptr) * tl.sqrt(tl.maximum(norm2, 0.0) / K.to(tl.float32))
        tl.store(std_ptr + std_rows, std, mask=rmask)

    @triton.jit
    def _splitmix64_tl(x):
        """flat._splitmix64 on uint64 (wrapping arithmetic, logical shifts)."""
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def flat_keys_kernel(ids_ptr, seed_ptr, step_ptr, micro_ptr, rank_ptr, keys_ptr, n, USE_MICRO: tl.constexpr,
                         BLOCK: tl.constexpr):
        """keys[i] = flat.noise_key(seed, step, micro or 0, ids[i], rank) for all layers in one launch (the torch
        version, device_noise_keys, is some 65 elementwise kernels, each a node of the step's CUDA graph)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        key = _splitmix64_tl(tl.load(seed_ptr).to(tl.uint64, bitcast=True))
        key = _splitmix64_tl(key ^ tl.load(step_ptr).to(tl.uint64, bitcast=True))
        if USE_MICRO:
            key = _splitmix64_tl(key ^ tl.load(micro_ptr).to(tl.uint64, bitcast=True))
        else:
            key = _splitmix64_tl(key)
        ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        key = _splitmix64_tl(key ^ ids)
        key = _splitmix64_tl(key ^ tl.load(rank_ptr).to(tl.uint64, bitcast=True))
        key = (key << 1) >> 1  # 63 bits, as noise_key
        tl.store(keys_ptr + offs, key.to(tl.int64, bitcast=True), mask=mask)


def _tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


# ---------------------------------------------------------------------------------------------------------
# layers and chunks
# ---------------------------------------------------------------------------------------------------------

# program shapes, the fastest of benchmarks/noise_kernel_sweep.py on an H200 with vectorised accesses
# (benchmarks/results/aligned_kernels/)
_NOISE_ROWS, _NOISE_CALLS, _NOISE_WARPS = 4, 32, 4  # a noise program: 4 rows, all columns in steps of 8 x 32
_NORM_ROWS, _NORM_COLS, _NORM_WARPS = 64, 64, 4  # a noise-scale program: 64 rows, the fan-in in steps of 64
_GRAM_COLS, _GRAM_WARPS = 128, 4  # a Gram program: one layer's A A^T, the fan-in in steps of 128
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ALIGN_ELEMENTS, _ALIGN_BYTES = 16, 16  # what _fan_in / _meta_pointer promise the compiler with ALIGNED


def _aligned(fan_in: int, *addresses: int, element_offset: int = 0) -> bool:
    """The kernels' ALIGNED promise for one layer: fan-in and output offset multiples of 16 elements, the
    tensors 16-byte aligned. True for every SD / SDXL attention layer; a layer that breaks it (an odd fan-in,
    a view at an odd offset) makes its launch take the unhinted path, which is correct, only slower."""
    return (fan_in % _ALIGN_ELEMENTS == 0 and element_offset % _ALIGN_ELEMENTS == 0
            and all(a % _ALIGN_BYTES == 0 for a in addresses))


def chunk_prefix(name: str) -> str:
    """The block a layer belongs to: its name without the last two non-numeric components
    ("...transformer_blocks.3.attn1.to_out.0" -> "...transformer_blocks.3")."""
    parts = name.split(".")
    removed = 0
    while parts and removed < 2:
        if not parts.pop().isdigit():
            removed += 1
    return ".".join(parts)


def layer_model(name: str) -> str:
    """The model a layer belongs to: the model index FlatLoRA's layer names start with ("1.text_model...")."""
    return name.split(".", 1)[0]


def chunk_family(name: str) -> str:
    """Blocks of one model whose prefixes differ only in their numbers ("0.down_blocks.1.attentions.0.
    transformer_blocks.1", "0.down_blocks.2.attentions.1.transformer_blocks.0"; "1.text_model.encoder.layers.3",
    "1.text_model.encoder.layers.4") run one after the other, so consecutive ones can share a chunk: fewer,
    larger launches."""
    model, _, rest = chunk_prefix(name).partition(".")
    return ".".join([model] + [p for p in rest.split(".") if p and not p.isdigit()])


def _chunk_runs(layers: list, max_chunk_numel: int) -> list[list]:
    """The layers of each chunk: whole consecutive blocks of one model, family (chunk_family) and weight dtype,
    at most max_chunk_numel elements and no more than the largest block, so merging never enlarges the temporary
    (the one live at the memory peak is the last forward chunk: SD 1.5 measured 1.012x peak memory when the
    last two levels of its up path shared one). A block larger than max_chunk_numel is split between its
    layers. A layer order that is not the execution order costs regenerations, not results."""
    def same_model_and_dtype(a, b) -> bool:
        return (a.model, a.weight.dtype) == (b.model, b.weight.dtype)

    blocks: list[list] = []
    for fl in layers:
        if blocks and chunk_prefix(blocks[-1][-1].flat_layer.name) == chunk_prefix(fl.flat_layer.name) \
                and same_model_and_dtype(blocks[-1][-1], fl):
            blocks[-1].append(fl)
        else:
            blocks.append([fl])
    sizes = [sum(fl.numel for fl in b) for b in blocks]
    cap = min(max_chunk_numel, max(sizes, default=1))
    runs: list[list] = []
    numel = 0
    for block, size in zip(blocks, sizes):
        if runs and numel + size <= cap and same_model_and_dtype(runs[-1][-1], block[0]) \
                and chunk_family(runs[-1][-1].flat_layer.name) == chunk_family(block[0].flat_layer.name):
            runs[-1].extend(block)
            numel += size
            continue
        runs.append([])
        numel = 0
        for fl in block:
            if runs[-1] and numel + fl.numel > cap:
                runs.append([])
                numel = 0
            runs[-1].append(fl)
            numel += fl.numel
    return runs


def _simple_adapter(layer: nn.Module, base: nn.Module, fan_in: int):
    """(A weight, B weight, scaling) when the layer's delta is exactly scaling * B @ A of one active adapter
    (the kernel computes the noise scale itself); None when the reference formula must (several adapters,
    merged, disabled, DoRA, grouped convolutions, unsupported dtypes or layouts)."""
    if layer.merged or layer.disable_adapters:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    a = active[0]
    if getattr(layer, "use_dora", {}).get(a, False):
        return None
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        return None
    A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
    scaling = layer.scaling[a]
    if not isinstance(scaling, (int, float)):
        return None
    r = A.shape[0]
    if (A.dtype != B.dtype or A.dtype not in _KERNEL_DTYPES or not A.is_contiguous() or not B.is_contiguous()
            or B.numel() != base.weight.shape[0] * r or A.numel() != r * fan_in):
        return None
    return A, B, float(scaling)


@dataclass
class _FastLayer:
    flat_layer: FlatLayer
    index: int  # position in the engine's layer list (key index, row of the meta table)
    rows: int
    cols: int
    std_offset: int
    chunk: int = -1
    local: int = -1
    offset: int = 0  # element offset in the chunk buffer
    simple: tuple | None = None  # (A, B, scaling) of this step, or None
    bwd_needed: bool = True  # the last forward's input required grad: backward will ask for W + eps
    state: tuple | None = None  # the adapter state `simple` was derived from
    wsq_key: tuple | None = None  # (address, version) of the weight its cached ||W_i||^2 were computed from
    model: str = ""  # layer_model(name): chunks never span models

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def weight(self) -> torch.Tensor:
        return self.flat_layer.base.weight


class _NormGroup(NamedTuple):
    """The layers whose noise scales one launch of each kernel computes: one weight dtype and one A/B dtype."""
    w_dtype: torch.dtype
    ab_dtype: torch.dtype
    programs: torch.Tensor  # int32 [n_programs, 2]: layer, first row (flat_norm_kernel)
    n_programs: int
    rp: int  # the largest rank, padded to a power of two >= 16
    aligned: bool  # every layer meets the ALIGNED promise (fan-in, W and A)
    layers: torch.Tensor  # int32 [n_layers] (flat_gram_kernel)
    n_layers: int


class _Chunk:
    def __init__(self, layers: list[_FastLayer], index: int):
        self.layers = layers
        self.index = index
        offset = 0
        for local, fl in enumerate(layers):
            fl.chunk, fl.local, fl.offset = index, local, offset
            offset += fl.numel
        self.numel = offset
        self.w_dtype = layers[0].weight.dtype
        self.programs: dict = {}  # subset of local layers (None: all) -> int32 [P, 2] device table
        self.aligned = False  # every layer meets the noise kernel's ALIGNED promise (set with the tables)


class FastFlat:
    """The fast engine behind a FlatLoRA (its settings and layers are the FlatLoRA's).

    kernels: "triton" (CUDA), "torch" (any device; the CPU tests and the GPU comparison use it) or "auto".
    Per step: one launch computes the keys and one the noise scales of all layers (begin_step); then one
    launch per chunk writes W + eps of its layers when a layer of the chunk runs and the chunk is not the live one.
    """

    def __init__(self, flat: FlatLoRA, kernels: str = "auto", rounds: int = PHILOX_ROUNDS,
                 max_chunk_numel: int = 1 << 24, evict_first: bool = True):
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, got {kernels!r}")
        self.flat = flat
        self.kernels = kernels
        self.evict_first = evict_first  # the kernels' EVICT_FIRST cache hints (a setting for the benchmark's A/B)
        self.rounds = int(rounds)
        self.max_chunk_numel = int(max_chunk_numel)
        self.device = None
        self.generations = 0  # chunk generations since construction (the tests and the benchmark count them)
        self._live: dict[torch.dtype, tuple] = {}
        self._built = False
        self._signature = None

    # --- setup ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        layers = self.flat.layers
        devices = {lay.base.weight.device for lay in layers}
        if len(devices) != 1:
            raise RuntimeError(f"Flat-LoRA fast path needs all perturbed layers on one device, got {devices}")
        self.device = devices.pop()
        kernels = self.kernels
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" and triton_available() else "torch"
        if kernels == "triton" and (triton is None or (self.device.type != "cuda" and not _interpreting())):
            raise RuntimeError("Triton kernels need Triton and CUDA tensors (or TRITON_INTERPRET=1)")
        self._use_triton = kernels == "triton"
        dev = self.device
        self.fast_layers: list[_FastLayer] = []
        total_rows = 0
        for i, lay in enumerate(layers):
            w = lay.base.weight
            if not w.is_contiguous() or w.dtype not in _KERNEL_DTYPES:
                raise RuntimeError(f"Flat-LoRA fast path needs contiguous float weights: {lay.name}")
            fl = _FastLayer(lay, i, w.shape[0], w[0].numel(), total_rows, model=layer_model(lay.name))
            total_rows += fl.rows
            self.fast_layers.append(fl)
        self._layer_ids = torch.tensor([_i64(lay.layer_id) for lay in layers], dtype=torch.int64, device=dev)
        self._keys = torch.zeros(len(layers), dtype=torch.int64, device=dev)
        self._std = torch.zeros(max(total_rows, 1), dtype=torch.float32, device=dev)
        self._wsq = torch.zeros(max(total_rows, 1), dtype=torch.float32, device=dev)  # ||W_i||^2, see _refresh
        self._gram = torch.zeros(0, dtype=torch.float32, device=dev)  # A A^T of each layer, per step
        self._sigma_t = torch.zeros(1, dtype=torch.float32, device=dev)
        self._step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._micro_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._seed_t = torch.tensor(_i64(self.flat.seed), dtype=torch.int64, device=dev)
        self._rank = int(self.flat.rank)
        self._rank_t = torch.tensor(self._rank, dtype=torch.int64, device=dev)
        self.chunks = [_Chunk(run, i) for i, run in enumerate(_chunk_runs(self.fast_layers, self.max_chunk_numel))]
        self._built = True

    def _refresh(self) -> None:
        """Per step: which layers the kernel scales itself (one plain adapter); tables rebuilt if anything moved;
        the cached row norms ||W_i||^2 of the noise-scale kernel recomputed for any weight that changed (another
        tensor, or written in place: torch bumps a tensor's version on every in-place write; a write through
        `.data` bypasses that, and nothing in this project writes frozen weights)."""
        sig = []
        for fl in self.fast_layers:
            lay = fl.flat_layer
            if self._use_triton:
                w = lay.base.weight
                wsq_key = (w.data_ptr(), w._version)
                if wsq_key != fl.wsq_key:
                    rows = slice(fl.std_offset, fl.std_offset + fl.rows)
                    self._wsq[rows].copy_(w.detach().reshape(fl.rows, -1).float().pow(2).sum(1))
                    fl.wsq_key = wsq_key
            d = lay.lora_layer.__dict__  # peft's plain attributes: a cheap key of the adapter state
            active = d.get("_active_adapter")
            state = (tuple(active) if isinstance(active, list) else active, tuple(d.get("merged_adapters", ())),
                     d.get("_disable_adapters"), tuple(d["scaling"].items()) if "scaling" in d else None)
            if state != fl.state or state[0] is None:
                fl.simple = _simple_adapter(lay.lora_layer, lay.base, fl.cols)
                fl.state = state
            w = lay.base.weight
            sig.append((w.data_ptr(), w.device) + ((fl.simple[0].data_ptr(), fl.simple[1].data_ptr(), fl.simple[2],
                                                    fl.simple[0].shape[0], fl.simple[0].dtype)
                                                   if fl.simple is not None else (None,)))
        sig = tuple(sig)
        if sig == self._signature:
            return
        if any(s[1] != self.device for s in sig):
            raise RuntimeError("a perturbed layer moved to another device after Flat-LoRA was set up")
        self._signature = sig
        self._torch_norm_layers = [fl for fl in self.fast_layers if fl.simple is None or not self._use_triton]
        for chunk in self.chunks:
            chunk.programs = {}
            chunk.aligned = all(_aligned(fl.cols, fl.weight.data_ptr(), element_offset=fl.offset)
                                for fl in chunk.layers)
        self._norm_groups = None
        if not self._use_triton:
            return
        meta, scales = [], []
        for fl in self.fast_layers:
            s = fl.simple
            a_ptr, b_ptr, r, scale = (s[0].data_ptr(), s[1].data_ptr(), s[0].shape[0], s[2]) if s else (0, 0, 0, 0.0)
            meta.append([fl.weight.data_ptr(), a_ptr, b_ptr, fl.cols, r, fl.offset, fl.std_offset, fl.index, fl.rows])
            scales.append(scale)
        self._meta = torch.tensor(meta, dtype=torch.int64, device=self.device)
        self._scales = torch.tensor(scales, dtype=torch.float32, device=self.device)
        groups: dict = {}
        for fl in self.fast_layers:
            if fl.simple is not None:
                key = (fl.weight.dtype, fl.simple[0].dtype)
                rp = max(16, 1 << max(fl.simple[0].shape[0] - 1, 0).bit_length())
                g = groups.setdefault(key, [[], 16, True, []])
                g[1] = max(g[1], rp)
                g[2] = g[2] and _aligned(fl.cols, fl.weight.data_ptr(), fl.simple[0].data_ptr())
                g[0].extend([fl.index, r0] for r0 in range(0, fl.rows, _NORM_ROWS))
                g[3].append(fl.index)
        as_table = lambda rows: torch.tensor(rows, dtype=torch.int32, device=self.device)  # noqa: E731
        self._norm_groups = [_NormGroup(w_dtype, ab_dtype, as_table(v[0]), len(v[0]), v[1], v[2], as_table(v[3]),
                                        len(v[3])) for (w_dtype, ab_dtype), v in groups.items()]
        rp_max = max([g.rp for g in self._norm_groups], default=0)
        self._gram = torch.zeros(len(self.fast_layers) * rp_max * rp_max, dtype=torch.float32, device=self.device)

    def _programs(self, chunk: _Chunk, subset):
        progs = chunk.programs.get(subset)
        if progs is None:
            rows = []
            for fl in chunk.layers:
                if subset is None or fl.local in subset:
                    rows.extend([fl.index, r0] for r0 in range(0, fl.rows, _NOISE_ROWS))
            progs = chunk.programs[subset] = torch.tensor(rows, dtype=torch.int32, device=self.device)
        return progs

    # --- per step ------------------------------------------------------------------------------------------
    def begin_step(self, step, micro_step) -> None:
        """Device state of a step: keys of all layers, sigma_t and the noise scales of all layers.
        `step` / `micro_step`: ints or 0-d int64 device tensors (then nothing is read on the host)."""
        flat = self.flat
        if not self._built:
            self._build()
        self._refresh()
        self._live.clear()
        for t, v in ((self._step_t, step), (self._micro_t, micro_step)):
            if torch.is_tensor(v):
                t.copy_(v.reshape(()))
            else:
                t.fill_(int(v))
        if self._use_triton:
            if int(flat.rank) != self._rank:  # the process group came up after setup
                self._rank = int(flat.rank)
                self._rank_t.fill_(self._rank)
            n = len(self.fast_layers)
            flat_keys_kernel[(triton.cdiv(n, 1024),)](
                self._layer_ids, self._seed_t, self._step_t, self._micro_t, self._rank_t, self._keys, n,
                USE_MICRO=bool(flat.per_microbatch), BLOCK=1024)
        else:
            micro = self._micro_t if flat.per_microbatch else 0
            self._keys.copy_(device_noise_keys(self._seed_t, self._step_t, micro, self._layer_ids, flat.rank))
        if flat.schedule == "constant" or flat.sigma == 0.0:  # one fill instead of a few kernels
            self._sigma_t.fill_(float(flat.sigma) if flat.schedule == "constant" else 0.0)
        else:
            self._sigma_t.copy_(device_sigma_at(self._step_t, flat.sigma, flat.schedule, flat.total_steps).reshape(1))
        self._compute_norms()

    def _compute_norms(self) -> None:
        if self._use_triton:
            interpreting = _interpreting()
            # a group's A A^T sits at layer * rp^2 with its own rp: groups of another rp may overlap its slots,
            # which is harmless because each group's norm launch directly follows its own Gram launch
            for g in self._norm_groups:
                flat_gram_kernel[(g.n_layers,)](
                    g.layers, self._meta, self._gram, AB_T=_tl_dtype(g.ab_dtype), RP=g.rp, BK=_GRAM_COLS,
                    PRECISION="ieee" if interpreting else "tf32x3", WHILE_LOOPS=interpreting, ALIGNED=g.aligned,
                    num_warps=_GRAM_WARPS,
                )
                flat_norm_kernel[(g.n_programs,)](
                    g.programs, self._meta, self._scales, self._sigma_t, self._wsq, self._gram, self._std,
                    W_T=_tl_dtype(g.w_dtype), AB_T=_tl_dtype(g.ab_dtype), BM=_NORM_ROWS, BK=_NORM_COLS, RP=g.rp,
                    WHILE_LOOPS=interpreting, ALIGNED=g.aligned,
                    SPLIT_BF16=g.w_dtype == torch.bfloat16 and not interpreting, num_warps=_NORM_WARPS,
                    EVICT_FIRST=self.evict_first,
                )
        for fl in self._torch_norm_layers:  # on the Triton path only the layers the kernel cannot scale
            std = self._std[fl.std_offset: fl.std_offset + fl.rows]
            if fl.simple is None:  # several adapters, DoRA, ...: the reference formula
                merged = fl.flat_layer.merged_weight()
                std.copy_(merged.reshape(fl.rows, -1).norm(dim=1) * (self._sigma_t / math.sqrt(fl.cols)))
            elif not self._use_triton:
                A, B, s = fl.simple
                w = fl.weight.detach().reshape(fl.rows, fl.cols).float()
                v = w + s * (B.detach().reshape(fl.rows, -1).float() @ A.detach().reshape(-1, fl.cols).float())
                std.copy_(self._sigma_t * torch.sqrt((v * v).sum(1) / fl.cols))

    def end_step(self) -> None:
        self._live.clear()

    def perturbed_weight(self, fl: _FastLayer, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        """W + eps of one layer in `dtype`: a view of its chunk's buffer, generated if that is not live.
        In backward only the layers of the chunk whose input needs a gradient are generated."""
        live = self._live.get(dtype)
        if live is None or live[0] != fl.chunk or (live[2] is not None and fl.local not in live[2]):
            chunk = self.chunks[fl.chunk]
            subset = None
            if backward:
                subset = frozenset(x.local for x in chunk.layers if x.bwd_needed or x is fl)
                if len(subset) == len(chunk.layers):
                    subset = None
            self._live.pop(dtype, None)  # the previous chunk's temporary is free before the next one is allocated
            buf = torch.empty(chunk.numel, dtype=dtype, device=self.device)
            self._generate(chunk, buf, add_w=True, subset=subset)
            live = (fl.chunk, buf, subset, {})
            self._live[dtype] = live
        views = live[3]  # a layer asks again in backward: its view of the buffer is made once per generation
        view = views.get(fl.local)
        if view is None:
            view = views[fl.local] = live[1][fl.offset: fl.offset + fl.numel].view(fl.weight.shape)
        return view

    def _generate(self, chunk: _Chunk, buf: torch.Tensor, add_w: bool, subset=None) -> None:
        self.generations += 1
        if self._use_triton:
            progs = self._programs(chunk, subset)
            flat_noise_kernel[(progs.shape[0],)](
                progs, self._meta, self._keys, self._std, buf,
                W_T=_tl_dtype(chunk.w_dtype), ADD_W=add_w, BM=_NOISE_ROWS, T=_NOISE_CALLS, ROUNDS=self.rounds,
                FAST=not _interpreting(), WHILE_LOOPS=_interpreting(), ALIGNED=chunk.aligned, num_warps=_NOISE_WARPS,
                EVICT_FIRST=self.evict_first,
            )
            return
        for fl in chunk.layers:
            if subset is not None and fl.local not in subset:
                continue
            std = self._std[fl.std_offset: fl.std_offset + fl.rows]
            z = standard_normal_grid(self._keys[fl.index], fl.rows, fl.cols, rounds=self.rounds)
            out = std[:, None] * z
            if add_w:
                out = out + fl.weight.detach().reshape(fl.rows, fl.cols).float()
            buf[fl.offset: fl.offset + fl.numel].copy_(out.reshape(-1))

    # --- inspection ----------------------------------------------------------------------------------------
    def row_std(self, fl: _FastLayer) -> torch.Tensor:
        """The noise scale of a layer at the current step (after begin_step)."""
        return self._std[fl.std_offset: fl.std_offset + fl.rows].clone()

    @torch.no_grad()
    def noise(self, layer: FlatLayer, step, micro_step: int = 0) -> torch.Tensor:
        """The eps (fp32, the weight's shape) the layer gets at `step`, exactly as the step computes it."""
        if self.flat.active:
            raise RuntimeError("FlatLoRA.noise() is for inspection outside perturb(): it would reset the step's state")
        self.begin_step(step, micro_step)
        try:
            fl = self.fast_layers[next(i for i, lay in enumerate(self.flat.layers) if lay.name == layer.name)]
            chunk = self.chunks[fl.chunk]
            buf = torch.empty(chunk.numel, dtype=torch.float32, device=self.device)
            self._generate(chunk, buf, add_w=False, subset=frozenset([fl.local]))
            return buf[fl.offset: fl.offset + fl.numel].view(fl.weight.shape).clone()
        finally:
            self.end_step()

    # --- the step --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def perturb(self, step, micro_step=None) -> Iterator:
        """As FlatLoRA.perturb. `step` may be a 0-d int64 device tensor (graph capture): then sigma_t = 0 is not
        short-circuited (the layers add 0 * z, which leaves W exact) and the yielded sigma_t is a tensor."""
        flat = self.flat
        if flat.active:
            raise RuntimeError("FlatLoRA.perturb is already active; nested perturbation is not supported")
        tensor_step = torch.is_tensor(step)
        if not tensor_step:
            sigma_t = flat.sigma_at(step)
            if sigma_t == 0.0 or not flat.layers:
                yield sigma_t
                return
        elif not flat.layers:
            yield torch.zeros((), device=step.device)
            return
        if micro_step is None:
            micro_step = flat._next_micro_step(step) if (flat.per_microbatch and not tensor_step) else 0
        flat.active = True
        try:
            with patched_forwards() as patch:
                self.begin_step(step, micro_step)
                for fl in self.fast_layers:
                    patch(fl.flat_layer.base, _fast_forward(self, fl))
                yield self._sigma_t[0] if tensor_step else sigma_t
        finally:
            self.end_step()
            flat.active = False


class _FastNoise:
    """The fast engine as a noise source of flat.noisy_forward: W + eps from the layer's block buffer."""

    __slots__ = ("engine", "fl")

    def __init__(self, engine: FastFlat, fl: _FastLayer):
        self.engine, self.fl = engine, fl

    def forward_seen(self, input_needs_grad: bool) -> None:
        self.fl.bwd_needed = input_needs_grad  # backward regenerates only the layers whose input needs a grad

    def weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        return self.engine.perturbed_weight(self.fl, dtype, backward=backward)


def _fast_forward(engine: FastFlat, fl: _FastLayer):
    return noisy_forward(fl.flat_layer.base, _FastNoise(engine, fl))


def engine_for(flat: FlatLoRA, backend: str):
    """The fast engine FlatLoRA(backend=...) uses, or None for the reference path.
    auto: the fast engine when the layers are on CUDA and Triton imports; cuda: it, or an error."""
    if backend == "reference" or not flat.layers:
        return None
    on_cuda = all(lay.base.weight.is_cuda for lay in flat.layers)
    if backend == "cuda":
        if not on_cuda:
            raise RuntimeError("FlatLoRA(backend='cuda') needs the perturbed layers on a CUDA device")
        if not triton_available():
            raise RuntimeError("FlatLoRA(backend='cuda') needs Triton (pip install triton)")
        return FastFlat(flat, kernels="triton")
    if on_cuda and triton_available():
        return FastFlat(flat, kernels="triton")
    return None


# ---------------------------------------------------------------------------------------------------------
# the step in a CUDA graph
# ---------------------------------------------------------------------------------------------------------


class GraphedTrainStep:
    """`step.TrainStep` with its forward + backward (the project's own `TrainStep._loss` and the accelerator's
    backward, Flat-LoRA inside) captured in a CUDA graph per batch shape and replayed; clipping, the optimizer
    and the LR schedule run eagerly after the replay, as in TrainStep.__call__. Same call, same result:

        step = GraphedTrainStep(TrainStep(...))
        loss, sigma_t = step(batch, global_step)

    What the graph needs and this class provides: the step number, micro-batch and the diffusion-noise seed
    enter as device state set before each replay (Flat-LoRA's keys and sigma_t are computed on the device
    from them); the gradients live in fixed tensors that the graph zeroes and fills (never set to None);
    batches are copied into static tensors (one graph per shape signature, sharing one memory pool).
    Limits: gradient accumulation 1, the Flat-LoRA fast engine (backend auto/cuda) or no Flat-LoRA.
    """

    def __init__(self, train_step, warmup: int = 2, pool=None):
        acc = train_step.accelerator
        if getattr(acc, "gradient_accumulation_steps", 1) != 1:
            raise ValueError("GraphedTrainStep supports gradient_accumulation_steps = 1")
        flat = train_step.flat
        if flat is not None and flat.layers and flat.fast_engine() is None:
            raise ValueError("GraphedTrainStep needs FlatLoRA's fast engine (backend='auto' or 'cuda' on CUDA)")
        self.ts = train_step
        self.flat = flat
        self.device = torch.device(acc.device)
        self.warmup = int(warmup)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.gen = torch.Generator(device=self.device)
        self.step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.micro_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.graphs: dict = {}

    @staticmethod
    def _tensors(batch):
        names = ["latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids"]
        out = [(n, getattr(batch, n)) for n in names if getattr(batch, n) is not None]
        out += [(f"input_ids{i}", t) for i, t in enumerate(batch.input_ids or [])]
        return out

    def _signature(self, batch):
        return tuple((n, tuple(t.shape), t.dtype) for n, t in self._tensors(batch)) + (batch.n_class,)

    def _body(self, static_batch):
        ts, acc = self.ts, self.ts.accelerator
        torch._foreach_zero_([p.grad for p in ts.params])
        ctx = self.flat.perturb(self.step_t, self.micro_t) if self.flat is not None else contextlib.nullcontext()
        with ctx:
            loss = ts._loss(static_batch, self.gen)
            acc.backward(loss)
        return loss.detach()

    def _capture(self, batch):
        import copy

        static = copy.copy(batch)
        for name, t in self._tensors(batch):
            clone = t.to(self.device, copy=True)
            if name.startswith("input_ids"):
                static.input_ids = list(static.input_ids)
                static.input_ids[int(name[9:])] = clone
            else:
                setattr(static, name, clone)
        for p in self.ts.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._body(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._body(static)
        return graph, static, loss

    def __call__(self, batch, global_step: int):
        from .step import step_generator

        ts, acc = self.ts, self.ts.accelerator
        micro = ts._micro_step(global_step)
        seed = step_generator(self.device, ts.options.seed, global_step, micro, acc.process_index).initial_seed()
        key = self._signature(batch)
        entry = self.graphs.get(key)
        if entry is None:
            self.gen.manual_seed(seed)
            self.step_t.fill_(global_step)
            self.micro_t.fill_(micro)
            entry = self.graphs[key] = self._capture(batch)
        graph, static, loss = entry
        for (_, dst), (_, src) in zip(self._tensors(static), self._tensors(batch)):
            dst.copy_(src, non_blocking=True)
        self.gen.manual_seed(seed)
        self.step_t.fill_(global_step)
        self.micro_t.fill_(micro)
        with acc.accumulate(*ts._trained_models()):
            graph.replay()
            ts.update()  # the gradients stay in the graph's fixed tensors: never zeroed to None here
        sigma_t = self.flat.sigma_at(global_step) if self.flat is not None else 0.0
        return loss.clone(), float(sigma_t)
