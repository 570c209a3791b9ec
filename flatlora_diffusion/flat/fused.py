"""The fused path: the same perturbation as the reference path, in a few fused launches per step.

`FlatLoRA(..., backend="auto")` uses this engine when its layers live on a CUDA device and Triton is
importable; `backend="reference"` keeps the per-layer torch path of reference.py, the specification.

What is the same as the reference path (checked on the CPU by tests/test_flat.py, whose specification runs
against both engines, with the fast-only checks in tests/test_flat_cuda.py; on the GPU by benchmarks/bench_flat.py):
- the law of eps: eps_ij = std_i * z_ij, std_i = sigma_t * ||W'_i|| / sqrt(fan-in), W' = W + s B A,
  z i.i.d. N(0, 1), no gradient through std;
- the key of a layer's noise: keys.noise_key(seed, step, micro, layer id, rank), here computed on the device
  for all layers at once (fused_kernels.flat_keys_kernel, fused_torch.device_noise_keys), so a captured CUDA
  graph replays with a new step;
- exactness: the frozen weights are never written; W + eps is a temporary, regenerated from (key, std) in
  backward and in gradient-checkpoint recomputation, so they see the same eps as the forward;
- the gradients of A and B are those of the fp32 computation with W + eps materialised;
- W + eps is formed in fp32 from W as stored: bf16, fp16, fp32, or float8 e4m3 (--low_memory), which the kernels
  widen exactly as they load it.

What differs: z comes from a counter-based generator (Philox-4x32 keyed by the layer key, counter = position
in the weight, Box-Muller), not from torch.Generator, so the draws are other numbers of the same law.

How it is fast:
- Layers are grouped in chunks (fused_chunks.py): consecutive transformer blocks (the layers whose names share the
  prefix before "attn1.to_q", "self_attn.q_proj", ...) of one family (names equal but for their numbers: the blocks
  of the down path, of the up path, the layers of a text encoder), up to max_chunk_numel elements and the size of
  the largest block; an SDXL 1280-wide block is a chunk of its own, two 640-wide ones share one. At the start of a
  step one Triton launch computes the keys of all layers, one A A^T of every layer and one the noise scales of all
  rows of all layers, from ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2 (s b_i).(W_i A^T) + (s b_i) A A^T (s b_i)^T:
  ||W_i||^2 is cached (W is frozen), so the step reads W once for W A^T on tensor cores and never forms B A. Then
  one launch per chunk writes W + eps for all its layers into one temporary buffer in the compute dtype (W loaded
  and W + eps stored with evict-first cache hints, so the step's activations stay in L2); the layers run cuBLAS on
  views of it. The buffer of the last chunk used is kept until another chunk is asked for, so a chunk's forward is
  one launch, its backward one launch, and the gradient-checkpoint recomputation of its blocks shares its launch
  with their backward. Extra memory: one chunk's temporary (<= the largest block), the noise scales and cached row
  norms (2 x 4 bytes per row) and A A^T (1 KiB per layer at rank 16).
- Where every fan-in is a multiple of 16 and the tensors 16-byte aligned (all SD / SDXL attention layers), the
  kernels are told so (ALIGNED) and load and store 16 bytes at a time.
- Seed, step, micro-batch and sigma_t are device tensors; nothing in the step reads them on the host, so the
  step can be captured in a CUDA graph (the trainer's graphed_step.GraphedTrainStep) with Flat-LoRA inside.

`kernels="torch"` runs the same algorithm with torch ops (fused_torch.py, a bit-exact emulation of the Philox
generator): it is what the CPU tests exercise, and what the GPU benchmark compares the Triton kernel against.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import torch
from torch import nn

from . import fused_kernels
from .fused_chunks import chunk_runs, layer_model
from .fused_kernels import (
    GRAM_COLS,
    GRAM_WARPS,
    KERNEL_DTYPES,
    NOISE_CALLS,
    NOISE_ROWS,
    NOISE_WARPS,
    NORM_COLS,
    NORM_ROWS,
    NORM_WARPS,
    WEIGHT_DTYPES,
    aligned,
    interpreting,
    tl_dtype,
    triton_available,
)
from .fused_torch import PHILOX_ROUNDS, device_noise_keys, device_sigma_at, standard_normal_grid, to_int64
from .layers import FlatLayer
from .perturbed_layers import noisy_forward, patched_forwards

if TYPE_CHECKING:  # FlatLoRA builds this engine; the engine only reads its settings and layers
    from .flat_lora import FlatLoRA


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
    if (A.dtype != B.dtype or A.dtype not in KERNEL_DTYPES or not A.is_contiguous() or not B.is_contiguous()
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
    forward: Any = None  # the base layer's perturbed forward, built at the first step and patched in at every step

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def weight(self) -> torch.Tensor:
        return self.flat_layer.base.weight


# weights whose W A^T the noise-scale kernel forms with two bf16 dots (exact in bf16; see fused_kernels._wa_tile)
SPLIT_BF16_WEIGHTS = (torch.bfloat16, torch.float8_e4m3fn)


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
        if kernels == "triton" and (not triton_available()
                                     or (self.device.type != "cuda" and not interpreting())):
            raise RuntimeError("Triton kernels need Triton and CUDA tensors (or TRITON_INTERPRET=1)")
        self._use_triton = kernels == "triton"
        dev = self.device
        self.fast_layers: list[_FastLayer] = []
        total_rows = 0
        for i, lay in enumerate(layers):
            w = lay.base.weight
            if not w.is_contiguous() or w.dtype not in WEIGHT_DTYPES:
                raise RuntimeError(f"Flat-LoRA fast path needs contiguous float weights: {lay.name}")
            fl = _FastLayer(lay, i, w.shape[0], w[0].numel(), total_rows, model=layer_model(lay.name))
            total_rows += fl.rows
            self.fast_layers.append(fl)
        self._layer_ids = torch.tensor([to_int64(lay.layer_id) for lay in layers], dtype=torch.int64, device=dev)
        self._keys = torch.zeros(len(layers), dtype=torch.int64, device=dev)
        self._std = torch.zeros(max(total_rows, 1), dtype=torch.float32, device=dev)
        self._wsq = torch.zeros(max(total_rows, 1), dtype=torch.float32, device=dev)  # ||W_i||^2, see _refresh
        self._gram = torch.zeros(0, dtype=torch.float32, device=dev)  # A A^T of each layer, per step
        self._sigma_t = torch.zeros(1, dtype=torch.float32, device=dev)
        self._step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._micro_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._seed_t = torch.tensor(to_int64(self.flat.seed), dtype=torch.int64, device=dev)
        self._rank = int(self.flat.rank)
        self._rank_t = torch.tensor(self._rank, dtype=torch.int64, device=dev)
        self.chunks = [_Chunk(run, i) for i, run in enumerate(chunk_runs(self.fast_layers, self.max_chunk_numel))]
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
            chunk.aligned = all(aligned(fl.cols, fl.weight.data_ptr(), element_offset=fl.offset)
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
                g[2] = g[2] and aligned(fl.cols, fl.weight.data_ptr(), fl.simple[0].data_ptr())
                g[0].extend([fl.index, r0] for r0 in range(0, fl.rows, NORM_ROWS))
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
                    rows.extend([fl.index, r0] for r0 in range(0, fl.rows, NOISE_ROWS))
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
            fused_kernels.flat_keys_kernel[(-(-n // 1024),)](
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
            interpreted = interpreting()
            # a group's A A^T sits at layer * rp^2 with its own rp: groups of another rp may overlap its slots,
            # which is harmless because each group's norm launch directly follows its own Gram launch
            for g in self._norm_groups:
                fused_kernels.flat_gram_kernel[(g.n_layers,)](
                    g.layers, self._meta, self._gram, AB_T=tl_dtype(g.ab_dtype), RP=g.rp, BK=GRAM_COLS,
                    PRECISION="ieee" if interpreted else "tf32x3", WHILE_LOOPS=interpreted, ALIGNED=g.aligned,
                    num_warps=GRAM_WARPS,
                )
                fused_kernels.flat_norm_kernel[(g.n_programs,)](
                    g.programs, self._meta, self._scales, self._sigma_t, self._wsq, self._gram, self._std,
                    W_T=tl_dtype(g.w_dtype), AB_T=tl_dtype(g.ab_dtype), BM=NORM_ROWS, BK=NORM_COLS, RP=g.rp,
                    WHILE_LOOPS=interpreted, ALIGNED=g.aligned,
                    SPLIT_BF16=g.w_dtype in SPLIT_BF16_WEIGHTS and not interpreted, num_warps=NORM_WARPS,
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
            fused_kernels.flat_noise_kernel[(progs.shape[0],)](
                progs, self._meta, self._keys, self._std, buf,
                W_T=tl_dtype(chunk.w_dtype), ADD_W=add_w, BM=NOISE_ROWS, T=NOISE_CALLS, ROUNDS=self.rounds,
                FAST=not interpreting(), WHILE_LOOPS=interpreting(), ALIGNED=chunk.aligned, num_warps=NOISE_WARPS,
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
    """The fast engine as a noise source of noisy_forward: W + eps from the layer's block buffer."""

    __slots__ = ("engine", "fl")

    def __init__(self, engine: FastFlat, fl: _FastLayer):
        self.engine, self.fl = engine, fl

    def forward_seen(self, input_needs_grad: bool) -> None:
        self.fl.bwd_needed = input_needs_grad  # backward regenerates only the layers whose input needs a grad

    def weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        return self.engine.perturbed_weight(self.fl, dtype, backward=backward)


def _fast_forward(engine: FastFlat, fl: _FastLayer):
    """The layer's perturbed forward: one object for the engine's life (noisy_forward says why)."""
    if fl.forward is None:
        fl.forward = noisy_forward(fl.flat_layer.base, _FastNoise(engine, fl))
    return fl.forward


def unreadable_weights(layers: list[FlatLayer]) -> str | None:
    """Why the fused kernels cannot read these layers' frozen weights (None: they can): a dtype other than
    bf16 / fp16 / fp32 / float8_e4m3fn (--low_memory's); the reference path upcasts any float dtype."""
    dtypes = sorted({str(lay.base.weight.dtype).removeprefix("torch.") for lay in layers
                     if lay.base.weight.dtype not in WEIGHT_DTYPES})
    return f"the perturbed weights are stored in {', '.join(dtypes)}, which the fused kernels do not read" if dtypes else None


def engine_for(flat: FlatLoRA, backend: str):
    """The fast engine FlatLoRA(backend=...) uses, or None for the reference path.
    auto: the fast engine when the layers are on CUDA, Triton imports and the kernels read the weights' dtype
    (else the reference path; the trainer's log line "Flat-LoRA path: ..." says why); cuda: it, or an error."""
    if backend == "reference" or not flat.layers:
        return None
    on_cuda = all(lay.base.weight.is_cuda for lay in flat.layers)
    unreadable = unreadable_weights(flat.layers)
    if backend == "cuda":
        if not on_cuda:
            raise RuntimeError("FlatLoRA(backend='cuda') needs the perturbed layers on a CUDA device")
        if not triton_available():
            raise RuntimeError("FlatLoRA(backend='cuda') needs Triton (pip install triton)")
        if unreadable:
            raise RuntimeError(f"FlatLoRA(backend='cuda'): {unreadable}")
        return FastFlat(flat, kernels="triton")
    if on_cuda and triton_available():
        return None if unreadable else FastFlat(flat, kernels="triton")
    return None
