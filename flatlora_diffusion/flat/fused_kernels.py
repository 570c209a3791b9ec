"""The fused path's Triton kernels: noise keys, noise scales (via A A^T and W A^T) and W + eps, for many
layers per launch; and the launch parameters the engine (fused.py) uses.

Triton is optional: without it the engine runs the same algorithm as torch ops (fused_torch.py), and
FlatLoRA falls back to the reference path on a machine without it. The numbers these kernels produce are
those of fused_torch.py (its module docstring describes the generator's layout).
"""

from __future__ import annotations

import os

import torch


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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _normal_pair_tl(word, FAST: tl.constexpr):
        """The Box-Muller pair of one Philox word (layout in fused_torch.py). FAST: the uniforms made with integer ops
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
        memory system busy while others run Philox rounds (the kernel sweep in benchmarks/HISTORY.md: 4 rows x 32 calls
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
        """acc += W[rows, k0:k0+BK] A[:, k0:k0+BK]^T on tensor cores. SPLIT_BF16 (W in bf16 or float8, both exact
        in bf16): A = A_hi + A_lo, both bf16, two bf16 dots (W exact, A to ~16 bits); else one tf32 dot. EVICT_FIRST:
        W, read once per step, is loaded under an L2 evict-first policy (see _noise_tile)."""
        cols = k0 + tl.arange(0, BK)
        cm = cols < K
        w = tl.load(w_base + rows64[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0,
                    eviction_policy="evict_first" if EVICT_FIRST else "")
        at = tl.load(a_base + rr64[None, :] * K + cols[:, None], mask=cm[:, None] & rmask_r[None, :],
                     other=0.0).to(tl.float32)
        if SPLIT_BF16:
            w = w.to(tl.bfloat16)  # a float8 W (--low_memory) widens exactly; a bf16 one is left as it is
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
        """keys.splitmix64 on uint64 (wrapping arithmetic, logical shifts)."""
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def flat_keys_kernel(ids_ptr, seed_ptr, step_ptr, micro_ptr, rank_ptr, keys_ptr, n, USE_MICRO: tl.constexpr,
                         BLOCK: tl.constexpr):
        """keys[i] = keys.noise_key(seed, step, micro or 0, ids[i], rank) for all layers in one launch (the torch
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


def tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
            torch.float8_e4m3fn: tl.float8e4nv}[dtype]


# program shapes, the fastest of the kernel sweep on an H200 with vectorised accesses (benchmarks/HISTORY.md)
NOISE_ROWS, NOISE_CALLS, NOISE_WARPS = 4, 32, 4  # a noise program: 4 rows, all columns in steps of 8 x 32
NORM_ROWS, NORM_COLS, NORM_WARPS = 64, 64, 4  # a noise-scale program: 64 rows, the fan-in in steps of 64
GRAM_COLS, GRAM_WARPS = 128, 4  # a Gram program: one layer's A A^T, the fan-in in steps of 128
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what A, B, W + eps and W may be
# W may also be stored in float8 (--low_memory, fp8_storage.py): the kernels widen it to fp32 (exact) as they load it,
# so W + eps is formed in fp32 from the stored W, as on the reference path
WEIGHT_DTYPES = KERNEL_DTYPES + (torch.float8_e4m3fn,)
_ALIGN_ELEMENTS, _ALIGN_BYTES = 16, 16  # what _fan_in / _meta_pointer promise the compiler with ALIGNED


def aligned(fan_in: int, *addresses: int, element_offset: int = 0) -> bool:
    """The kernels' ALIGNED promise for one layer: fan-in and output offset multiples of 16 elements, the
    tensors 16-byte aligned. True for every SD / SDXL attention layer; a layer that breaks it (an odd fan-in,
    a view at an odd offset) makes its launch take the unhinted path, which is correct, only slower."""
    return (fan_in % _ALIGN_ELEMENTS == 0 and element_offset % _ALIGN_ELEMENTS == 0
            and all(a % _ALIGN_BYTES == 0 for a in addresses))
