#!/usr/bin/env python3
"""Variants of Flat-LoRA's noise pass on the GPU, timed alone on the layer shapes of the SDXL and SD 1.5 UNets.

    python benchmarks/noise_kernel_sweep.py --out results/      # H200: ~1 min; no diffusers needed

    python benchmarks/noise_kernel_sweep.py --out results/ --parts norms   # the noise-scale kernels only

One "pass" = W + eps for every perturbed layer, one launch per transformer block (the engine's first
chunking; the "merged" part times its current one), the launches captured in a CUDA graph as in the graphed
training step. Timed:
- noise: the first kernel of the project (16 rows x 256 columns per program, W loaded after the Philox rounds;
  kept here as `legacy_kernel`), the engine's kernel until commit a05b424 (`rows64_noise_kernel`, GEN
  "philox24") in several program shapes, another column layout, a fused noise-scale + noise kernel (the engine's
  noise tile now); each output compared bitwise with the first kernel's where the layout is
  the same. Floors: a copy kernel with the same grid (reads W, writes the buffer) and a store-only variant.
- norms: the direct noise-scale kernel (`direct_norm_kernel`, all layers in one launch, unhinted) and the
  expansion variants first tried (`norm_kernel_expansion`, also with SPLIT_BF16; slow before ALIGNED existed),
  with the largest relative difference of their noise scales.
- merged: the copy floor and the kernel until a05b424 with consecutive blocks of one width sharing a launch, as the
  engine's chunks do now (blocks of one family, up to the largest block's size).
- wat: the engine's noise scales (flat_gram_kernel + flat_norm_kernel: the cached ||W_i||^2, W A^T on tensor
  cores, G = A A^T per layer) against the direct kernel they replaced (`direct_norm_kernel`), vs fp64.
- rng: cheaper ways from Philox bits to normals (`rows64_noise_kernel`, `rng_contiguous_kernel`: uniforms by
  integer ops, one 32-bit word per Box-Muller pair, sin/cos by polynomials, 8 consecutive columns per thread)
  against the engine's noise pass (flat_cuda.flat_noise_kernel) and copy floors, merged chunks or one launch for
  all layers, with the law of z.
- latency: the engine's noise tile with shorter dependency chains per program (Triton's pipelined column loop, two
  tiles per iteration, one program per tile), outputs compared bitwise. (A part "grid", the engine's kernel with
  k programs per multiprocessor striding over the program table, ran at commit cf26568:
  results/rng_kernels/h200_grid_sweep.*.)
- aligned: direct_norm_kernel and the noise kernel until a05b424 (merged chunks) with ALIGNED, i.e. vectorised loads and stores,
  in several program shapes, against the unhinted kernels; noise scales against an fp64 reference.
Prints and writes JSON. Results: benchmarks/results/h200_noise_kernel_sweep.*, h200_norm_kernel_expansion.*,
h200_norm_shapes_and_merged_chunks.*, h200_norm_kernel_bf16x2.*, aligned_kernels/, rng_kernels/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flatlora_diffusion import flat_cuda as fc  # noqa: E402

# only for a smoke run of this script's plumbing in Triton's interpreter (the engine's kernels take while loops there)
INTERPRET = fc._interpreting()


def block_shapes(arch: str):
    """(rows, cols) of the attention LoRA layers of one transformer block, and the number of such blocks."""
    if arch == "sdxl":
        ctx = 2048
        levels = [(640, 10), (1280, 60)]
    else:
        ctx = 768
        levels = [(320, 5), (640, 5), (1280, 6)]
    out = []
    for c, n in levels:
        layers = [(c, c)] * 4 + [(c, c), (c, ctx), (c, ctx), (c, c)]
        out.append((layers, n))
    return out


@triton.jit
def copy_kernel(prog_ptr, meta_ptr, out_ptr, W_T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    lay = tl.load(prog_ptr + 2 * pid)
    r0 = tl.load(prog_ptr + 2 * pid + 1)
    m = meta_ptr + lay.to(tl.int64) * 9
    K = tl.load(m + 3)
    n_rows = tl.load(m + 8)
    w_base = tl.load(m + 0).to(tl.pointer_type(W_T))
    out_base = out_ptr + tl.load(m + 5)
    rows = (r0 + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < n_rows
    for c0 in range(0, K, BN):
        cols = c0 + tl.arange(0, BN)
        off = rows[:, None] * K + cols[None, :]
        msk = rmask[:, None] & (cols < K)[None, :]
        tl.store(out_base + off, tl.load(w_base + off, mask=msk), mask=msk)


@triton.jit
def _noise_tile_late(c0, K, key, t, ctr1, zero, rows64, rmask, std, w_base, out_base, ROUNDS: tl.constexpr):
    """The first implementation's tile: W loaded after the Philox rounds (same output)."""
    ctr0 = (c0 // 4 + t).to(tl.uint32)[None, :] + zero
    i1, i2, i3, i4 = tl.philox(key, ctr0, ctr1, zero, zero, ROUNDS)
    z1, z2 = _normal_pair_bits(i1, i2, False)
    z3, z4 = _normal_pair_bits(i3, i4, False)
    off = rows64[:, None] * K + (c0 + t)[None, :]
    cols = c0 + t
    m1 = rmask[:, None] & (cols < K)[None, :]
    m2 = rmask[:, None] & (cols + 64 < K)[None, :]
    m3 = rmask[:, None] & (cols + 128 < K)[None, :]
    m4 = rmask[:, None] & (cols + 192 < K)[None, :]
    ty = out_base.dtype.element_ty
    w1 = tl.load(w_base + off, mask=m1, other=0.0).to(tl.float32)
    tl.store(out_base + off, (std[:, None] * z1 + w1).to(ty), mask=m1)
    w2 = tl.load(w_base + off + 64, mask=m2, other=0.0).to(tl.float32)
    tl.store(out_base + off + 64, (std[:, None] * z2 + w2).to(ty), mask=m2)
    w3 = tl.load(w_base + off + 128, mask=m3, other=0.0).to(tl.float32)
    tl.store(out_base + off + 128, (std[:, None] * z3 + w3).to(ty), mask=m3)
    w4 = tl.load(w_base + off + 192, mask=m4, other=0.0).to(tl.float32)
    tl.store(out_base + off + 192, (std[:, None] * z4 + w4).to(ty), mask=m4)


@triton.jit
def legacy_kernel(prog_ptr, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T: tl.constexpr, BM: tl.constexpr,
                  ROUNDS: tl.constexpr, TILES: tl.constexpr, ROWLOOP: tl.constexpr):
    """The kernel before this sweep: programs of BM rows x 256 * TILES columns (ROWLOOP: all columns), W loaded
    after the Philox rounds."""
    pid = tl.program_id(0)
    m, K, w_base, out_base, key, rows, rmask, rows64 = fc._program_rows(prog_ptr, pid, 3, meta_ptr, keys_ptr,
                                                                         out_ptr, W_T, BM)
    c_start = tl.load(prog_ptr + 3 * pid + 2)
    std = tl.load(std_ptr + tl.load(m + 6) + rows64, mask=rmask, other=0.0)
    t = tl.arange(0, 64)
    zero = tl.zeros((BM, 64), dtype=tl.uint32)
    ctr1 = rows.to(tl.uint32)[:, None] + zero
    if ROWLOOP:
        for c0 in range(0, K, 256):
            _noise_tile_late(c0, K, key, t, ctr1, zero, rows64, rmask, std, w_base, out_base, ROUNDS)
    else:
        for j in tl.static_range(TILES):
            _noise_tile_late(c_start + j * 256, K, key, t, ctr1, zero, rows64, rmask, std, w_base, out_base, ROUNDS)


@triton.jit
def interleaved_kernel(prog_ptr, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T: tl.constexpr, BM: tl.constexpr,
                       ROUNDS: tl.constexpr):
    """Another layout: one Philox call -> 4 consecutive columns (vector loads/stores of 4 elements per call)."""
    m, K, w_base, out_base, key, rows, rmask, rows64 = fc._program_rows(prog_ptr, tl.program_id(0), 2, meta_ptr,
                                                                         keys_ptr, out_ptr, W_T, BM)
    std = tl.load(std_ptr + tl.load(m + 6) + rows64, mask=rmask, other=0.0)
    t = tl.arange(0, 64)
    zero = tl.zeros((BM, 64), dtype=tl.uint32)
    ctr1 = rows.to(tl.uint32)[:, None] + zero
    for c0 in range(0, K, 256):
        ctr0 = (c0 // 4 + t).to(tl.uint32)[None, :] + zero
        i1, i2, i3, i4 = tl.philox(key, ctr0, ctr1, zero, zero, ROUNDS)
        z1, z2 = _normal_pair_bits(i1, i2, False)
        z3, z4 = _normal_pair_bits(i3, i4, False)
        z = tl.reshape(tl.join(tl.join(z1, z3), tl.join(z2, z4)), (BM, 256))
        cols = c0 + tl.arange(0, 256)
        off = rows64[:, None] * K + cols[None, :]
        msk = rmask[:, None] & (cols < K)[None, :]
        v = std[:, None] * z + tl.load(w_base + off, mask=msk, other=0.0).to(tl.float32)
        tl.store(out_base + off, v.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _norm_tile_expansion(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK: tl.constexpr):
    """One BK-column slice of the fan-in: ||W_i||^2, W_i A^T and A A^T accumulated (fp32, dots in tf32)."""
    cols = k0 + tl.arange(0, BK)
    cm = cols < K
    w = tl.load(w_base + rows64[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    a = tl.load(a_base + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=rmask_r[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    ww += tl.sum(w * w, axis=1)
    wa = tl.dot(w, tl.trans(a), wa, input_precision="tf32")
    g = tl.dot(a, tl.trans(a), g, input_precision="tf32")
    return ww, wa, g

@triton.jit
def norm_kernel_expansion(
    prog_ptr,  # int32 [P, 2]: layer (row of meta), first row
    meta_ptr,  # int64 [L, 9] as above
    scale_ptr,  # fp32 [L]: LoRA scaling s
    sigma_ptr,  # fp32 [1]: sigma_t
    std_ptr,  # fp32 [total rows], written
    W_T: tl.constexpr,
    AB_T: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    RP: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,  # the interpreter cannot run range() over a loaded bound
    SPLIT_BF16: tl.constexpr = False,
):
    """Tried (8x slower on an H200 than flat_cuda.flat_norm_kernel): std_row from the expansion
    ||W_i||^2 + 2 (s b_i) . (A W_i^T) + (s b_i) (A A^T) (s b_i)^T: the loop keeps only BM x R and R x R
    accumulators (never B A), so a program can take many rows and A is read once per BM rows of W.
    SPLIT_BF16 (W must be bf16; also tried, 3.7x-11x slower, as accurate): W A^T on bf16 tensor cores with A
    split into two bf16 parts, W used as loaded (_norm_tile_bf16x2). Triton's interpreter cannot run it."""
    m, K, R, w_base, a_base, b_base, s, rows64, rmask, rr, rmask_r = fc._norm_program_rows(
        prog_ptr, meta_ptr, scale_ptr, W_T, AB_T, BM, RP)
    ww = tl.zeros((BM,), dtype=tl.float32)
    wa = tl.zeros((BM, RP), dtype=tl.float32)
    g = tl.zeros((RP, RP), dtype=tl.float32)
    if WHILE_LOOPS:
        k0 = K * 0
        while k0 < K:
            ww, wa, g = _expansion_tile(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK,
                                        SPLIT_BF16)
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            ww, wa, g = _expansion_tile(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK,
                                        SPLIT_BF16)
    b = tl.load(b_base + rows64[:, None] * R + rr[None, :], mask=rmask[:, None] & rmask_r[None, :], other=0.0)
    b = b.to(tl.float32) * s
    bg = tl.dot(b, g, input_precision="tf32" if SPLIT_BF16 else "ieee")
    norm2 = ww + 2.0 * tl.sum(b * wa, axis=1) + tl.sum(bg * b, axis=1)
    std = tl.load(sigma_ptr) * tl.sqrt(tl.maximum(norm2, 0.0) / K.to(tl.float32))
    tl.store(std_ptr + tl.load(m + 6) + rows64, std, mask=rmask)


@triton.jit
def _expansion_tile(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK: tl.constexpr,
                    SPLIT_BF16: tl.constexpr):
    if SPLIT_BF16:
        ww, wa, g = _norm_tile_bf16x2(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK)
    else:
        ww, wa, g = _norm_tile_expansion(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK)
    return ww, wa, g


@triton.jit
def _norm_tile_bf16x2(k0, K, rows64, rmask, rr, rmask_r, w_base, a_base, ww, wa, g, BK: tl.constexpr):
    """One BK-column slice for norm_kernel_expansion with SPLIT_BF16: ||W_i||^2 in fp32, W_i A^T as two bf16
    tensor-core dots (A = A_hi + A_lo, both bf16: ~16 mantissa bits, W exact in bf16), A A^T in tf32."""
    cols = k0 + tl.arange(0, BK)
    cm = cols < K
    w = tl.load(w_base + rows64[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
    a = tl.load(a_base + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=rmask_r[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    a_hi = a.to(tl.bfloat16)
    a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
    wf = w.to(tl.float32)
    ww += tl.sum(wf * wf, axis=1)
    wa = tl.dot(w, tl.trans(a_hi), wa)
    wa = tl.dot(w, tl.trans(a_lo), wa)
    g = tl.dot(a, tl.trans(a), g, input_precision="tf32")
    return ww, wa, g


@triton.jit
def fused_kernel(prog_ptr, meta_ptr, keys_ptr, scale_ptr, sigma_ptr, std_ptr, out_ptr, W_T: tl.constexpr,
                 AB_T: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, ROUNDS: tl.constexpr):
    """Noise scale of BM rows (||W + sBA|| over the fan-in), then W + eps of those rows: W read twice, the
    second time from L2."""
    pid = tl.program_id(0)
    m, K, w_base, out_base, key, rows, rmask, rows64 = fc._program_rows(prog_ptr, pid, 2, meta_ptr, keys_ptr,
                                                                         out_ptr, W_T, BM)
    R = tl.load(m + 4)
    a_base = tl.load(m + 1).to(tl.pointer_type(AB_T))
    b_base = tl.load(m + 2).to(tl.pointer_type(AB_T))
    s = tl.load(scale_ptr + tl.load(prog_ptr + 2 * pid))
    rr = tl.arange(0, RP)
    rmask_r = rr < R
    std = _direct_row_std(m, K, R, rows64, rmask, rr, rmask_r, w_base, a_base, b_base, s, sigma_ptr, std_ptr, BM, BK)
    t = tl.arange(0, 32)
    j = tl.arange(0, 8)
    zero = tl.zeros((BM, 32), dtype=tl.uint32)
    ctr1 = rows.to(tl.uint32)[:, None] + zero
    for c0 in range(0, K, 256):  # the engine's noise tile (since commit a05b424)
        fc._noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, True, ROUNDS, True)


@triton.jit
def _direct_norm_tile(k0, K, rows64, rmask, rr, rmask_r, b, w_base, a_base, BK: tl.constexpr):
    cols = k0 + tl.arange(0, BK)
    cm = cols < K
    w = tl.load(w_base + rows64[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
    a = tl.load(a_base + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=rmask_r[:, None] & cm[None, :],
                other=0.0)
    v = w.to(tl.float32) + tl.dot(b, a.to(tl.float32), input_precision="tf32")
    return tl.sum(v * v, axis=1)


@triton.jit
def _direct_row_std(m, K, R, rows64, rmask, rr, rmask_r, w_base, a_base, b_base, s, sigma_ptr, std_ptr,
                    BM: tl.constexpr, BK: tl.constexpr):
    """sigma_t ||W_i + s (B A)_i|| / sqrt(K) of the program's rows, stored and returned."""
    b = tl.load(b_base + rows64[:, None] * R + rr[None, :], mask=rmask[:, None] & rmask_r[None, :], other=0.0)
    b = b.to(tl.float32) * s
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc += _direct_norm_tile(k0, K, rows64, rmask, rr, rmask_r, b, w_base, a_base, BK)
    std = tl.load(sigma_ptr) * tl.sqrt(acc / K.to(tl.float32))
    tl.store(std_ptr + tl.load(m + 6) + rows64, std, mask=rmask)
    return std


@triton.jit
def direct_norm_kernel(prog_ptr, meta_ptr, scale_ptr, sigma_ptr, std_ptr, W_T: tl.constexpr, AB_T: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, WHILE_LOOPS: tl.constexpr,
                       ALIGNED: tl.constexpr = False):
    """The engine's noise-scale kernel until commit 304b556 (16 x 256 programs; 32 x 128 with ALIGNED there):
    ||W_i + s (B A)_i||^2 with B A formed tile by tile in tf32. WHILE_LOOPS is accepted and ignored."""
    m, K, R, w_base, a_base, b_base, s, rows64, rmask, rr, rmask_r = fc._norm_program_rows(
        prog_ptr, meta_ptr, scale_ptr, W_T, AB_T, BM, RP, ALIGNED)
    _direct_row_std(m, K, R, rows64, rmask, rr, rmask_r, w_base, a_base, b_base, s, sigma_ptr, std_ptr, BM, BK)


# ---------------------------------------------------------------------------------------------------------
# part "rng": cheaper ways from Philox bits to normals (the noise pass is bound by Philox + Box-Muller)
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _unit_interval_bits(bits, SHIFT: tl.constexpr):
    """A float in [1, 2) whose mantissa starts with `bits` shifted left by SHIFT: an int -> float conversion
    done with integer ops (I2F runs on a quarter-rate unit, like the transcendentals)."""
    return ((bits << SHIFT) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _normal_pair_bits(b1, b2, FAST_UNIFORM: tl.constexpr):
    """Box-Muller of two 32-bit words (24-bit uniforms), fast lg2 / cos / sin: the engine's generator before
    commit a05b424; FAST_UNIFORM: 23-bit uniforms made with integer ops."""
    if FAST_UNIFORM:  # 23-bit uniforms: u1 = j / 2^23 in (0, 1], theta = (j + 0.5) / 2^23 * 2 pi - pi
        u1 = 2.0 - _unit_interval_bits(b1 >> 9, 0)
        th = _unit_interval_bits(b2 >> 9, 0) * 6.283185307179586 - 9.424777586262351
    else:
        u1 = ((b1 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
        th = ((b2 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08 * 6.283185307179586 - 3.141592653589793
    r = tl.sqrt(-1.3862943611198906 * fc.libdevice.fast_log2f(u1))
    return r * fc.libdevice.fast_cosf(th), r * fc.libdevice.fast_sinf(th)


@triton.jit
def _normal_pair_word(w, SINCOS: tl.constexpr):
    """Box-Muller of ONE 32-bit word: radius from its top 20 bits (u1 = (j + 0.5) / 2^20, |z| <= 5.4), angle
    from its low 12 bits (4096 directions; all moments below order 4096 of cos, sin are exact). SINCOS "mufu":
    fast sin/cos; "poly": quadrant from 2 bits, Taylor polynomials of degree 7/8 on [-pi/4, pi/4) (|err| < 4e-7)
    on the FMA units."""
    u1 = 1.9999995231628418 - _unit_interval_bits(w >> 12, 3)
    r = tl.sqrt(-1.3862943611198906 * fc.libdevice.fast_log2f(u1))
    a = w & 0xFFF
    if SINCOS == "poly":
        x = _unit_interval_bits(a & 0x3FF, 13) * 1.5707963267948966 - 2.355427499798402
        x2 = x * x
        s = x + x * x2 * (-0.16666666666666666 + x2 * (0.008333333333333333 + x2 * -0.0001984126984126984))
        c = 1.0 + x2 * (-0.5 + x2 * (0.041666666666666664 + x2 * (-0.001388888888888889
                                                                   + x2 * 2.48015873015873e-05)))
        q = a >> 10
        swap = (q & 1) != 0
        cq = tl.where(swap, s, c)
        sq = tl.where(swap, c, s)
        cq = tl.where(((q + 1) & 2) != 0, -cq, cq)
        sq = tl.where((q & 2) != 0, -sq, sq)
    else:
        th = _unit_interval_bits(a, 11) * 6.283185307179586 - 9.424010970375436
        cq = fc.libdevice.fast_cosf(th)
        sq = fc.libdevice.fast_sinf(th)
    return r * cq, r * sq


@triton.jit
def _rng_store(out_base, w_base, off, msk, std, z, ADD_W: tl.constexpr, w):
    v = std[:, None] * z
    if ADD_W:
        v = v + w
    tl.store(out_base + off, v.to(out_base.dtype.element_ty), mask=msk)


@triton.jit
def rows64_noise_kernel(prog_ptr, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T: tl.constexpr, BM: tl.constexpr,
                        ADD_W: tl.constexpr, GEN: tl.constexpr, SINCOS: tl.constexpr, ROUNDS: tl.constexpr = 10,
                        ALIGNED: tl.constexpr = False):
    """W + std * z over all columns of BM rows in [BM, 64] tiles, z from:
    GEN "philox24": the engine's kernel before commit a05b424 (4 normals per Philox call from 24-bit uniforms;
    per 256 columns, output j of call t -> column 64 j + t), the same code (its eps over all SDXL draws has the
    previous engine kernel's mean, std, kurtosis and max to every printed digit: results/rng_kernels/);
    GEN "copy": z = 0 (std * 0 + W: the memory floor of these programs);
    GEN "pairs2": as philox24 with 23-bit uniforms made with integer ops;
    GEN "pairs4": 8 normals per Philox call, one word per Box-Muller pair (_normal_pair_word); per 256 columns,
    32 calls, pair p of call t -> columns 64 p + 2 t, 64 p + 2 t + 1 (joined in registers)."""
    m, K, w_base, out_base, key, rows, rmask, rows64 = fc._program_rows(prog_ptr, tl.program_id(0), 2, meta_ptr,
                                                                         keys_ptr, out_ptr, W_T, BM, ALIGNED)
    std = tl.load(std_ptr + tl.load(m + 6) + rows64, mask=rmask, other=0.0)
    t64 = tl.arange(0, 64)
    if GEN != "pairs4":
        zero = tl.zeros((BM, 64), dtype=tl.uint32)
        t = t64
    else:
        zero = tl.zeros((BM, 32), dtype=tl.uint32)
        t = tl.arange(0, 32)
    ctr1 = rows.to(tl.uint32)[:, None] + zero
    for c0 in range(0, K, 256):
        cols = c0 + t64
        off = rows64[:, None] * K + cols[None, :]
        m1 = rmask[:, None] & (cols < K)[None, :]
        m2 = rmask[:, None] & (cols + 64 < K)[None, :]
        m3 = rmask[:, None] & (cols + 128 < K)[None, :]
        m4 = rmask[:, None] & (cols + 192 < K)[None, :]
        w1 = 0.0
        w2 = 0.0
        w3 = 0.0
        w4 = 0.0
        if ADD_W:
            w1 = tl.load(w_base + off, mask=m1, other=0.0).to(tl.float32)
            w2 = tl.load(w_base + off + 64, mask=m2, other=0.0).to(tl.float32)
            w3 = tl.load(w_base + off + 128, mask=m3, other=0.0).to(tl.float32)
            w4 = tl.load(w_base + off + 192, mask=m4, other=0.0).to(tl.float32)
        if GEN == "copy":  # the floor: the same programs reading W and writing it, no generator
            z1 = tl.zeros((BM, 64), dtype=tl.float32)
            z2 = z1
            z3 = z1
            z4 = z1
        elif GEN == "pairs2" or GEN == "philox24":
            ctr0 = (c0 // 4 + t).to(tl.uint32)[None, :] + zero
            i1, i2, i3, i4 = tl.philox(key, ctr0, ctr1, zero, zero, ROUNDS)
            z1, z2 = _normal_pair_bits(i1, i2, GEN == "pairs2")
            z3, z4 = _normal_pair_bits(i3, i4, GEN == "pairs2")
        else:
            ctr0 = (c0 // 8 + t).to(tl.uint32)[None, :] + zero
            i1, i2, i3, i4 = tl.philox(key, ctr0, ctr1, zero, zero, 10)
            a, b = _normal_pair_word(i1, SINCOS)
            z1 = tl.reshape(tl.join(a, b), (BM, 64))
            a, b = _normal_pair_word(i2, SINCOS)
            z2 = tl.reshape(tl.join(a, b), (BM, 64))
            a, b = _normal_pair_word(i3, SINCOS)
            z3 = tl.reshape(tl.join(a, b), (BM, 64))
            a, b = _normal_pair_word(i4, SINCOS)
            z4 = tl.reshape(tl.join(a, b), (BM, 64))
        _rng_store(out_base, w_base, off, m1, std, z1, ADD_W, w1)
        _rng_store(out_base, w_base, off + 64, m2, std, z2, ADD_W, w2)
        _rng_store(out_base, w_base, off + 128, m3, std, z3, ADD_W, w3)
        _rng_store(out_base, w_base, off + 192, m4, std, z4, ADD_W, w4)



@triton.jit
def _contiguous_setup(prog_ptr, pid, PROG_COLS: tl.constexpr, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T: tl.constexpr,
                      BM: tl.constexpr, T: tl.constexpr, ALIGNED: tl.constexpr):
    """What a program of [BM rows, T calls, 8 columns] tiles needs (as the engine's flat_noise_kernel sets it up)."""
    m, K, w_base, out_base, key, rows, rmask, rows64 = fc._program_rows(prog_ptr, pid, PROG_COLS, meta_ptr, keys_ptr,
                                                                         out_ptr, W_T, BM, ALIGNED)
    std = tl.load(std_ptr + tl.load(m + 6) + rows64, mask=rmask, other=0.0)
    zero = tl.zeros((BM, T), dtype=tl.uint32)
    ctr1 = rows.to(tl.uint32)[:, None] + zero
    return K, key, tl.arange(0, T), tl.arange(0, 8), ctr1, zero, rows64, rmask, std, w_base, out_base


@triton.jit
def rng_contiguous_kernel(prog_ptr, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T: tl.constexpr, BM: tl.constexpr,
                          T: tl.constexpr, ADD_W: tl.constexpr, GEN: tl.constexpr, SINCOS: tl.constexpr,
                          ALIGNED: tl.constexpr):
    """Each thread one Philox call (c0 = col // 8, c1 = row) -> 8 normals -> 8 consecutive columns (16-byte loads
    and stores; the prototype of the engine's layout, its order of the 8 columns within a call differs). Tiles of
    BM rows x T calls (8 T columns) over all columns. GEN "copy": the same programs without the generator."""
    K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base = _contiguous_setup(
        prog_ptr, tl.program_id(0), 2, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T, BM, T, ALIGNED)
    for c0 in range(0, K, 8 * T):
        cols = c0 + 8 * t[None, :, None] + j[None, None, :]
        off = rows64[:, None, None] * K + cols
        msk = rmask[:, None, None] & (cols < K)
        if ADD_W:
            w = tl.load(w_base + off, mask=msk, other=0.0).to(tl.float32)
        else:
            w = tl.zeros((BM, T, 8), dtype=tl.float32)
        if GEN == "copy":
            v = w
        else:
            ctr0 = (c0 // 8 + t).to(tl.uint32)[None, :] + zero
            i1, i2, i3, i4 = tl.philox(key, ctr0, ctr1, zero, zero, 10)
            a1, b1 = _normal_pair_word(i1, SINCOS)
            a2, b2 = _normal_pair_word(i2, SINCOS)
            a3, b3 = _normal_pair_word(i3, SINCOS)
            a4, b4 = _normal_pair_word(i4, SINCOS)
            z = tl.join(tl.join(tl.join(a1, b1), tl.join(a2, b2)), tl.join(tl.join(a3, b3), tl.join(a4, b4)))
            v = w + std[:, None, None] * tl.reshape(z, (BM, T, 8))
        tl.store(out_base + off, v.to(out_base.dtype.element_ty), mask=msk)



@triton.jit
def latency_kernel(prog_ptr, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T: tl.constexpr, BM: tl.constexpr,
                   T: tl.constexpr, MODE: tl.constexpr, STAGES: tl.constexpr):
    """The engine's noise tile (fc._noise_tile, ALIGNED) with less latency in a program's chain: MODE "stages":
    the column loop software-pipelined by Triton (tl.range num_stages); "unroll2": two column tiles per
    iteration; "colsplit": one program per (rows, 8 T columns) tile (program table [layer, r0, c0])."""
    pid = tl.program_id(0)
    cols_in_table: tl.constexpr = 3 if MODE == "colsplit" else 2
    K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base = _contiguous_setup(
        prog_ptr, pid, cols_in_table, meta_ptr, keys_ptr, std_ptr, out_ptr, W_T, BM, T, True)
    if MODE == "colsplit":
        c0 = tl.multiple_of(tl.load(prog_ptr + 3 * pid + 2), 8 * T)
        fc._noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, True, 10, True)
    elif MODE == "unroll2":
        for c0 in range(0, K, 16 * T):
            fc._noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, True, 10, True)
            fc._noise_tile(c0 + 8 * T, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, True, 10, True)
    else:
        for c0 in tl.range(0, K, 8 * T, num_stages=STAGES):
            fc._noise_tile(c0, K, key, t, j, ctr1, zero, rows64, rmask, std, w_base, out_base, True, 10, True)


class Layers:
    """Random layers of one architecture, in chunks, with the meta table of flat_cuda."""

    def __init__(self, arch, device, rank=16, merge=False):
        """merge: consecutive blocks of one width share a chunk up to the largest block's size, as the engine's
        chunks of one family do (SDXL: 70 -> 65 launches per pass; SD 1.5: 16 -> 9); "all": one chunk (one
        launch per pass); else one chunk per block."""
        torch.manual_seed(0)
        self.chunks = []  # list of list of layer indices
        self.W, meta, scales, self.A, self.B = [], [], [], [], []
        std_off = 0
        largest = max(sum(r * c for r, c in layers) for layers, _ in block_shapes(arch))
        for layers, n in block_shapes(arch):
            block_numel = sum(r * c for r, c in layers)
            per_chunk = max(1, largest // block_numel) if merge else 1
            for blk in range(n):
                if blk % per_chunk == 0 and not (merge == "all" and self.W):
                    idx, off = [], 0
                for rows, cols in layers:
                    i = len(self.W)
                    w = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02
                    a = torch.randn(rank, cols, device=device) * 0.01
                    b = torch.randn(rows, rank, device=device) * 0.01
                    self.W.append(w)
                    self.A.append(a)
                    self.B.append(b)
                    meta.append([w.data_ptr(), a.data_ptr(), b.data_ptr(), cols, rank, off, std_off, i, rows])
                    scales.append(1.0)
                    idx.append(i)
                    off += rows * cols
                    std_off += rows
                if merge == "all":
                    self.chunks[:] = [(idx, off)]
                elif blk % per_chunk == per_chunk - 1 or blk == n - 1:
                    self.chunks.append((idx, off))
        self.meta = torch.tensor(meta, dtype=torch.int64, device=device)
        self.scales = torch.tensor(scales, dtype=torch.float32, device=device)
        self.keys = torch.randint(0, 2 ** 62, (len(self.W),), dtype=torch.int64, device=device)
        self.std = torch.rand(std_off, device=device) * 1e-3
        self.sigma = torch.full((1,), 0.1, device=device)
        self.bufs = [torch.empty(n, dtype=torch.bfloat16, device=device) for _, n in self.chunks]
        self.numel = sum(n for _, n in self.chunks)
        self.meta_rows = meta

    def exact_row_std(self):
        """The noise scales in fp64 (sigma 0.1, scaling 1), the reference the kernels are measured against."""
        return torch.cat([(w.double() + b.double() @ a.double()).norm(dim=1) * 0.1 / w.shape[1] ** 0.5
                          for w, a, b in zip(self.W, self.A, self.B)])

    def tables(self, bm, cols_step=None):
        """Per chunk: int32 program table, [layer, r0] (cols_step None) or [layer, r0, c0]."""
        out = []
        for idx, _ in self.chunks:
            rows = []
            for i in idx:
                r, k = self.meta_rows[i][8], self.meta_rows[i][3]
                for r0 in range(0, r, bm):
                    if cols_step is None:
                        rows.append([i, r0])
                    else:
                        rows.extend([i, r0, c0] for c0 in range(0, k, cols_step))
            out.append(torch.tensor(rows, dtype=torch.int32, device=self.meta.device))
        return out


def record_norms(res, arch, name, launch, L, exact):
    """Time a noise-scale launch (writes L.std), then its largest relative error against `exact`."""
    try:
        ms = time_graphed(launch)
        L.std.zero_()
        launch()
        torch.cuda.synchronize()
        res[name] = {"ms": round(ms, 4), "TBps_read": round(L.numel * 2 / ms / 1e9, 3),
                     "max_rel_err_vs_fp64": ((L.std.double() - exact).abs() / exact).max().item()}
    except Exception as exc:  # a variant that does not compile is reported, not fatal
        res[name] = {"error": repr(exc)[:300]}
    print(arch, name, res[name], flush=True)


def time_graphed(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2]


def sweep(arch, device, parts=("noise", "norms")):
    L = Layers(arch, device)
    bf = tl.bfloat16
    res = {"elements": L.numel, "chunks": len(L.chunks)}
    ref_holder = []

    def record(name, fn, ref=None, layers=L):
        """Time `fn` (it writes layers.bufs); with `ref`, also whether its output equals ref bitwise."""
        try:
            ms = time_graphed(fn)
        except Exception as exc:  # a variant that does not compile is reported, not fatal
            res[name] = {"error": repr(exc)[:300]}
            print(arch, name, "ERROR", repr(exc)[:300], flush=True)
            return
        same = None
        if ref:
            fn()
            torch.cuda.synchronize()
            same = all(torch.equal(a, b) for a, b in zip(ref, layers.bufs))
        res[name] = {"ms": round(ms, 4), "TBps_rw": round(layers.numel * 4 / ms / 1e9, 3),
                     "same_output_as_before": same}
        print(arch, name, res[name], flush=True)

    if "noise" in parts:
        # the kernel before this session: programs of 16 rows x 256*TILES columns, W loaded after Philox
        for tiles, warps in ((1, 4), (4, 8)):
            tabs = L.tables(16, 256 * tiles)

            def old(tabs=tabs, tiles=tiles, warps=warps):
                for buf, p in zip(L.bufs, tabs):
                    legacy_kernel[(p.shape[0],)](p, L.meta, L.keys, L.std, buf, W_T=bf, BM=16, ROUNDS=10, TILES=tiles,
                                                 ROWLOOP=False, num_warps=warps)
            record(f"before_bm16_tiles{tiles}_w{warps}", old, None if tiles == 1 else ref_holder)
            if tiles == 1:
                old()
                torch.cuda.synchronize()
                ref_holder[:] = [b.clone() for b in L.bufs]
        for bm, warps in ((4, 4), (4, 2), (2, 2)):
            tabs = L.tables(bm, 1 << 30)

            def old_rl(tabs=tabs, bm=bm, warps=warps):
                for buf, p in zip(L.bufs, tabs):
                    legacy_kernel[(p.shape[0],)](p, L.meta, L.keys, L.std, buf, W_T=bf, BM=bm, ROUNDS=10, TILES=1,
                                                 ROWLOOP=True, num_warps=warps)
            record(f"rowloop_late_load_bm{bm}_w{warps}", old_rl, ref_holder)
        for bm, bn, warps in ((8, 512, 4), (4, 256, 2), (16, 256, 4)):
            tabs = L.tables(bm)

            def cp(tabs=tabs, bm=bm, bn=bn, warps=warps):
                for buf, p in zip(L.bufs, tabs):
                    copy_kernel[(p.shape[0],)](p, L.meta, buf, W_T=bf, BM=bm, BN=bn, num_warps=warps)
            record(f"copy_floor_bm{bm}_bn{bn}_w{warps}", cp)
        # flat_cuda.flat_noise_kernel (W loaded before the Philox rounds), all columns per program
        for bm, warps in ((4, 4), (4, 2), (2, 2), (2, 1), (8, 4), (8, 8), (16, 8)):
            tabs = L.tables(bm)
            variants = [(True, 10)] + ([(False, 10), (True, 7)] if (bm, warps) == (4, 4) else [])
            for add_w, rounds in variants:
                def rl(tabs=tabs, bm=bm, warps=warps, add_w=add_w, rounds=rounds):
                    for buf, p in zip(L.bufs, tabs):
                        rows64_noise_kernel[(p.shape[0],)](
                            p, L.meta, L.keys, L.std, buf, W_T=bf, BM=bm, ADD_W=add_w, GEN="philox24", SINCOS="",
                            ROUNDS=rounds, num_warps=warps)
                name = (f"flat_noise_kernel_bm{bm}_w{warps}" + ("" if add_w else "_storeonly")
                        + ("" if rounds == 10 else "_r7"))
                record(name, rl, ref_holder if (add_w and rounds == 10) else None)
        for bm, warps in ((8, 4), (16, 4), (16, 8)):
            tabs = L.tables(bm)

            def il(tabs=tabs, bm=bm, warps=warps):
                for buf, p in zip(L.bufs, tabs):
                    interleaved_kernel[(p.shape[0],)](p, L.meta, L.keys, L.std, buf, W_T=bf, BM=bm, ROUNDS=10,
                                                      num_warps=warps)
            record(f"interleaved_bm{bm}_w{warps}", il)
    if "norms" in parts:
        # noise scales: one launch over all layers, unhinted (before ALIGNED): the direct kernel, then the first
        # expansion kernel (||W||^2 + 2 sb.(A W^T) + sb (A A^T) sb^T, all three terms in the loop) in several shapes
        ref_std = None
        # (the expansion variant's other shapes, all slower still, are in h200_norm_kernel_expansion.json)
        # (the shapes of the current kernel tried in this session are in h200_norm_shapes_and_merged_chunks.json)
        for kind, bm, bk, warps, stages in (("before", 16, 256, 4, 3), ("expansion", 64, 128, 4, 3),
                                            ("bf16x2", 64, 128, 4, 3), ("bf16x2", 64, 64, 4, 3),
                                            ("bf16x2", 128, 64, 4, 3), ("bf16x2", 64, 256, 4, 3),
                                            ("bf16x2", 128, 128, 8, 3), ("bf16x2", 64, 128, 4, 4),
                                            ("bf16x2", 32, 128, 4, 3)):
            p = torch.tensor([[i, r0] for i, m in enumerate(L.meta_rows) for r0 in range(0, m[8], bm)],
                             dtype=torch.int32, device=device)
            kernel = direct_norm_kernel if kind == "before" else norm_kernel_expansion
            extra = {"SPLIT_BF16": True} if kind == "bf16x2" else {}

            def nrm(p=p, bm=bm, bk=bk, warps=warps, kernel=kernel, stages=stages, extra=extra):
                kernel[(p.shape[0],)](p, L.meta, L.scales, L.sigma, L.std, W_T=bf, AB_T=tl.float32, BM=bm, BK=bk, RP=16,
                                      WHILE_LOOPS=False, num_warps=warps, num_stages=stages, **extra)
            name = f"norms_{kind}_bm{bm}_bk{bk}_w{warps}_s{stages}"
            try:
                ms = time_graphed(nrm)
                nrm()
                torch.cuda.synchronize()
                if ref_std is None:
                    ref_std = L.std.clone()
                rel = ((L.std - ref_std).abs() / ref_std).max().item()
                res[name] = {"ms": round(ms, 4), "TBps_read": round(L.numel * 2 / ms / 1e9, 3),
                             "max_rel_diff_vs_before": rel}
            except Exception as exc:
                res[name] = {"error": repr(exc)[:300]}
            print(arch, name, res[name], flush=True)
    if "wat" in parts:
        # noise scales as the engine computes them now: flat_gram_kernel (A A^T per layer) + flat_norm_kernel (the
        # expansion with the cached ||W_i||^2, W A^T on tensor cores), against the direct kernel it replaced.
        # Earlier runs of this part (the same expansion in a sweep-local kernel, unhinted and ALIGNED, a read-only
        # floor, tf32x3 and several Gram kernels): results/aligned_kernels/h200_norm_kernel_wat*.
        exact = L.exact_row_std()
        wsq = torch.cat([w.float().pow(2).sum(1) for w in L.W])
        G = torch.zeros(len(L.W) * 16 * 16, device=device)
        all_layers = torch.arange(len(L.W), dtype=torch.int32, device=device)
        g_exact = torch.stack([a.double() @ a.double().T for a in L.A])
        for prec, bk in (("tf32x3", 128), ("tf32", 128), ("ieee", 128)):
            def gram(prec=prec, bk=bk):
                fc.flat_gram_kernel[(len(L.W),)](all_layers, L.meta, G, AB_T=tl.float32, RP=16, BK=bk,
                                                 PRECISION=prec, WHILE_LOOPS=INTERPRET, ALIGNED=True, num_warps=4)
            name = f"gram_{prec}_bk{bk}_w4"
            ms = time_graphed(gram)
            G.zero_()
            gram()
            torch.cuda.synchronize()
            err = ((G.view(-1, 16, 16).double() - g_exact).abs().max() / g_exact.abs().max()).item()
            res[name] = {"ms": round(ms, 4), "max_rel_err": err}
            print(arch, name, res[name], flush=True)
        for kind, bm, bk, warps in (("direct_unaligned", 16, 256, 4), ("direct", 32, 128, 4),
                                    ("engine_bf16x2", 64, 64, 4), ("engine_bf16x2", 64, 128, 4),
                                    ("engine_bf16x2", 128, 64, 4), ("engine_tf32", 64, 64, 4)):
            p = torch.tensor([[i, r0] for i, m in enumerate(L.meta_rows) for r0 in range(0, m[8], bm)],
                             dtype=torch.int32, device=device)
            if kind.startswith("direct"):
                def nrm(p=p, bm=bm, bk=bk, warps=warps, aligned=kind == "direct"):
                    direct_norm_kernel[(p.shape[0],)](p, L.meta, L.scales, L.sigma, L.std, W_T=bf, AB_T=tl.float32,
                                                      BM=bm, BK=bk, RP=16, WHILE_LOOPS=False, ALIGNED=aligned,
                                                      num_warps=warps)
            else:
                def nrm(p=p, bm=bm, bk=bk, warps=warps, split=kind == "engine_bf16x2"):
                    fc.flat_norm_kernel[(p.shape[0],)](p, L.meta, L.scales, L.sigma, wsq, G, L.std, W_T=bf,
                                                       AB_T=tl.float32, BM=bm, BK=bk, RP=16, WHILE_LOOPS=INTERPRET,
                                                       ALIGNED=True, SPLIT_BF16=split, num_warps=warps)
            record_norms(res, arch, f"norms_{kind}_bm{bm}_bk{bk}_w{warps}", nrm, L, exact)
    if "aligned" in parts:
        # the engine's kernels with ALIGNED (fan-ins multiples of 16, 16-byte aligned bases: vectorised loads
        # and stores) in several program shapes, against the unaligned ones as the engine ran them before
        exact = L.exact_row_std()
        # (the first sweep of shapes, 16-64 rows x 128-512 columns, is in results/aligned_kernels/*sweep1*)
        for aligned, bm, bk, warps, stages in ((False, 16, 256, 4, 3), (True, 32, 128, 4, 3), (True, 32, 128, 2, 3),
                                               (True, 32, 64, 2, 3), (True, 32, 64, 4, 3), (True, 64, 64, 4, 3),
                                               (True, 16, 128, 4, 3), (True, 32, 128, 4, 4), (True, 32, 128, 4, 2),
                                               (True, 64, 128, 8, 3), (True, 16, 64, 2, 3)):
            p = torch.tensor([[i, r0] for i, m in enumerate(L.meta_rows) for r0 in range(0, m[8], bm)],
                             dtype=torch.int32, device=device)

            def nrm(p=p, bm=bm, bk=bk, warps=warps, stages=stages, aligned=aligned):
                direct_norm_kernel[(p.shape[0],)](p, L.meta, L.scales, L.sigma, L.std, W_T=bf, AB_T=tl.float32,
                                                   BM=bm, BK=bk, RP=16, WHILE_LOOPS=False, ALIGNED=aligned,
                                                   num_warps=warps, num_stages=stages)
            record_norms(res, arch, f"norms_{'aligned' if aligned else 'unaligned'}_bm{bm}_bk{bk}_w{warps}_s{stages}",
                         nrm, L, exact)
        M = Layers(arch, device, merge=True)
        res["merged_chunks"] = len(M.chunks)
        ref = []
        for aligned, bm, warps, add_w in ((False, 4, 4, True), (True, 4, 2, True), (True, 2, 2, True),
                                          (True, 8, 2, True), (True, 2, 1, True), (True, 1, 1, True),
                                          (True, 4, 2, False), (True, 2, 1, False)):
            tabs = M.tables(bm)

            def run(tabs=tabs, bm=bm, warps=warps, add_w=add_w, aligned=aligned):
                for buf, p in zip(M.bufs, tabs):
                    rows64_noise_kernel[(p.shape[0],)](p, M.meta, M.keys, M.std, buf, W_T=bf, BM=bm, ADD_W=add_w,
                                                       GEN="philox24", SINCOS="", ALIGNED=aligned, num_warps=warps)
            name = (f"merged_noise_{'aligned' if aligned else 'unaligned'}_bm{bm}_w{warps}"
                    + ("" if add_w else "_storeonly"))
            # "same_output_as_before": bitwise equal to the first (unaligned) variant's W + eps
            record(name, run, ref if add_w else None, layers=M)
            if not ref and "error" not in res[name]:
                run()
                torch.cuda.synchronize()
                ref[:] = [b.clone() for b in M.bufs]
    if "merged" in parts:
        # the engine's chunks since blocks of one family share one (fewer, larger launches): floor and kernel
        M = Layers(arch, device, merge=True)
        res["merged_chunks"] = len(M.chunks)
        for name, kernel, kw in (("copy_floor_bm8_bn512_w4", copy_kernel, dict(BM=8, BN=512, num_warps=4)),
                                 ("flat_noise_kernel_bm4_w4", rows64_noise_kernel,
                                  dict(ADD_W=True, BM=4, GEN="philox24", SINCOS="", num_warps=4))):
            tabs = M.tables(kw["BM"])
            args = (M.meta,) if kernel is copy_kernel else (M.meta, M.keys, M.std)

            def run(tabs=tabs, kernel=kernel, kw=kw, args=args):
                for buf, p in zip(M.bufs, tabs):
                    kernel[(p.shape[0],)](p, *args, buf, W_T=bf, **kw)
            record(f"merged_{len(M.chunks)}_launches_{name}", run)
    if "noise" in parts:
        for bm, bk, warps in ((16, 128, 4),):
            tabs = L.tables(bm)

            def fu(tabs=tabs, bm=bm, bk=bk, warps=warps):
                for buf, p in zip(L.bufs, tabs):
                    fused_kernel[(p.shape[0],)](p, L.meta, L.keys, L.scales, L.sigma, L.std, buf, W_T=bf,
                                                AB_T=tl.float32, BM=bm, BK=bk, RP=16, ROUNDS=10, num_warps=warps)
            record(f"fused_norm_noise_bm{bm}_bk{bk}_w{warps}", fu)
    if "rng" in parts:
        # other ways from Philox bits to normals and other memory layouts, with ALIGNED, in the engine's merged
        # chunks ("merged") or all layers in one launch ("one"); store-only variants also get the law of
        # z = out / std over all elements (mean, std, excess kurtosis, largest |z|)
        sets = {"merged": Layers(arch, device, merge=True), "one": Layers(arch, device, merge="all")}
        res["merged_chunks"] = len(sets["merged"].chunks)
        src = torch.randn(sets["one"].numel, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = time_graphed(lambda: dst.copy_(src))
        res["rng_torch_copy_one_tensor"] = {"ms": round(ms, 4), "TBps_rw": round(src.numel() * 4 / ms / 1e9, 3)}
        print(arch, "rng_torch_copy_one_tensor", res["rng_torch_copy_one_tensor"], flush=True)
        del src, dst
        variants = [("merged", "rows64", "philox24", "", 4, 0, 2, True),
                    ("merged", "rows64", "philox24", "", 4, 0, 2, False),
                    ("one", "rows64", "philox24", "", 4, 0, 2, True),
                    ("merged", "engine", "", "", 4, 32, 4, True), ("merged", "engine", "", "", 4, 32, 4, False),
                    ("merged", "rows64", "copy", "", 4, 0, 2, True),
                    ("merged", "rows64", "pairs2", "mufu", 4, 0, 2, True),
                    ("merged", "rows64", "pairs2", "mufu", 4, 0, 2, False),
                    ("merged", "rows64", "pairs4", "mufu", 4, 0, 2, True),
                    ("merged", "rows64", "pairs4", "mufu", 4, 0, 2, False),
                    ("merged", "rows64", "pairs4", "poly", 4, 0, 2, True),
                    ("merged", "rows64", "pairs4", "poly", 4, 0, 2, False),
                    ("merged", "rows64", "pairs4", "poly", 8, 0, 4, True)]
        for lay in ("merged", "one"):
            for bm, t, warps in ((4, 16, 2), (2, 16, 1), (4, 32, 4), (8, 16, 4), (1, 32, 1), (8, 8, 2)):
                variants.append((lay, "contiguous", "copy", "", bm, t, warps, True))
        for bm, t, warps in ((4, 16, 2), (2, 16, 1), (4, 32, 4), (8, 16, 4), (1, 32, 1), (8, 8, 2), (4, 8, 1)):
            variants.append(("merged", "contiguous", "pairs4", "mufu", bm, t, warps, True))
        variants += [("merged", "contiguous", "pairs4", "mufu", 4, 16, 2, False),
                     ("merged", "contiguous", "pairs4", "poly", 4, 16, 2, True),
                     ("merged", "contiguous", "pairs4", "poly", 4, 16, 2, False),
                     ("one", "contiguous", "pairs4", "mufu", 4, 16, 2, True),
                     ("one", "contiguous", "pairs4", "mufu", 2, 16, 1, True)]
        for lay, kind, gen, sincos, bm, t, warps, add_w in variants:
            M = sets[lay]
            tabs = M.tables(bm)

            def run(M=M, tabs=tabs, kind=kind, gen=gen, sincos=sincos, bm=bm, t=t, warps=warps, add_w=add_w):
                for buf, p in zip(M.bufs, tabs):
                    args = (p, M.meta, M.keys, M.std, buf)
                    if kind == "engine":
                        fc.flat_noise_kernel[(p.shape[0],)](*args, W_T=bf, ADD_W=add_w, BM=bm, T=t, ROUNDS=10,
                                                            FAST=not INTERPRET, WHILE_LOOPS=INTERPRET, ALIGNED=True,
                                                            num_warps=warps)
                    elif kind == "rows64":
                        rows64_noise_kernel[(p.shape[0],)](*args, W_T=bf, BM=bm, ADD_W=add_w, GEN=gen, SINCOS=sincos,
                                                          ALIGNED=True, num_warps=warps)
                    else:
                        rng_contiguous_kernel[(p.shape[0],)](*args, W_T=bf, BM=bm, T=t, ADD_W=add_w, GEN=gen,
                                                             SINCOS=sincos, ALIGNED=True, num_warps=warps)
            name = (f"rng_{lay}_{kind}_{gen + '_' if gen else ''}{sincos + '_' if sincos else ''}bm{bm}"
                    + (f"_t{t}" if t else "") + f"_w{warps}" + ("" if add_w else "_storeonly"))
            record(name, run, layers=M)
            if not add_w and "error" not in res[name]:
                run()
                torch.cuda.synchronize()
                z = torch.cat([buf.float() for buf in M.bufs])
                z = z / torch.cat([M.std[M.meta_rows[i][6]:M.meta_rows[i][6] + M.meta_rows[i][8]]
                                   .repeat_interleave(M.meta_rows[i][3]) for idx, _ in M.chunks for i in idx])
                zd = z.double()
                mean, std = zd.mean().item(), zd.std().item()
                res[name]["law"] = {"n": z.numel(), "mean": mean, "std": std,
                                    "excess_kurtosis": (((zd - mean) / std) ** 4).mean().item() - 3.0,
                                    "max_abs": zd.abs().max().item()}
                print(arch, name, res[name]["law"], flush=True)
                del z, zd
    if "latency" in parts:
        # shorter dependency chains per program: Triton's pipelined column loop, two tiles per iteration, one
        # program per tile; outputs compared bitwise with the engine's kernel
        M = Layers(arch, device, merge=True)
        ref = []
        for mode, bm, t, warps, stages in (("engine", 4, 32, 4, 0), ("stages", 4, 32, 4, 1), ("stages", 4, 32, 4, 2),
                                           ("stages", 4, 32, 4, 3), ("unroll2", 4, 32, 4, 0),
                                           ("unroll2", 4, 16, 2, 0), ("colsplit", 4, 32, 4, 0),
                                           ("colsplit", 8, 32, 8, 0), ("colsplit", 2, 32, 2, 0),
                                           ("colsplit", 4, 16, 2, 0)):
            tabs = M.tables(bm, 8 * t if mode == "colsplit" else None)

            def run(tabs=tabs, mode=mode, bm=bm, t=t, warps=warps, stages=stages):
                for buf, p in zip(M.bufs, tabs):
                    if mode == "engine":
                        fc.flat_noise_kernel[(p.shape[0],)](p, M.meta, M.keys, M.std, buf, W_T=bf, ADD_W=True,
                                                            BM=bm, T=t, ROUNDS=10, FAST=True, WHILE_LOOPS=False,
                                                            ALIGNED=True, num_warps=warps)
                    else:
                        latency_kernel[(p.shape[0],)](p, M.meta, M.keys, M.std, buf, W_T=bf, BM=bm, T=t, MODE=mode,
                                                      STAGES=stages, num_warps=warps)
            name = f"latency_{mode}_bm{bm}_t{t}_w{warps}" + (f"_s{stages}" if mode == "stages" else "")
            record(name, run, ref or None, layers=M)
            if not ref and "error" not in res[name]:
                run()
                torch.cuda.synchronize()
                ref[:] = [b.clone() for b in M.bufs]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", default="sdxl,sd15")
    ap.add_argument("--parts", default="noise,norms,merged",
                    help="which launches to time: noise, norms, merged (noise pass in the engine's merged chunks), "
                         "wat, aligned, rng, latency")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for arch in args.archs.split(","):
        res[arch] = sweep(arch, device, args.parts.split(","))
        (out / "noise_kernel_sweep.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
