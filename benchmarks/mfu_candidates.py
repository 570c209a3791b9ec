#!/usr/bin/env python3
"""MFU of the LoRA training step and what each candidate change buys (issue 20, part 3).

    python benchmarks/mfu_candidates.py --out DIR [--arch sdxl] [--batches 1,4] [--n 10] [--warm 3]
        [--variants baseline,sdpa_flash,sdpa_cudnn,sdpa_efficient,channels_last,no_input_cast,compile,
                    compile_blocks,compile_transformers,compile_geglu,norms_bf16,fused_lora,
                    compile_blocks+norms_bf16]
        [--time-limit 480] [--op-table N] [--lora-matmuls]
    python benchmarks/mfu_candidates.py --tiny --device cpu --out /tmp/m   # smoke test of this script
    python benchmarks/mfu_candidates.py --table RESULTS_JSON [...]        # results as one markdown table

Times bench_flat.py's step (`step.TrainStep`: noise, UNet, loss, backward, clipping, AdamW; bf16 autocast, frozen
weights bf16, rank-16 attention LoRA in fp32, prompt embeddings given) without Flat-LoRA, since MFU is defined on
the LoRA step (Flat-LoRA's share on top is bench_flat.py's ratio), replayed from a CUDA graph as the trainer does
(`graphed_step.GraphedTrainStep`). One change a variant against the baseline (the trainer as it is):

- sdpa_flash / sdpa_cudnn / sdpa_efficient: attention held to one SDPA backend (torch.nn.attention.sdpa_kernel)
  while the step is warmed up, captured and replayed;
- channels_last: the UNet's weights and the latents in channels-last memory format;
- no_input_cast: peft's LoRA layers leave their input in bf16 instead of casting it to the fp32 LoRA weights'
  dtype (peft.helpers.disable_input_dtype_casting); autocast runs the LoRA matmuls in bf16 either way;
- compile: the UNet's forward through torch.compile (inductor, without CUDA graphs of its own: the step's graph
  captures its kernels), compiled during the graph's warm-up steps;
- compile_blocks: the trainer's --torch_compile (flatlora_diffusion/compiled_blocks.py), regional compilation:
  torch.compile of each transformer block (BasicTransformerBlock) and ResNet block (ResnetBlock2D) alone; blocks
  of one shape share their compiled code, so compiling takes a fraction of the whole UNet's 301 s (first_step_s:
  78-85 s on an H100) while fusing most of the same elementwise work;
- compile_transformers: the same with each whole spatial transformer (Transformer2DModel: its GroupNorm, the
  layout changes in and out and its blocks) as the region, and the ResNet blocks;
- compile_geglu: only the feed-forward's GEGLU (its projection, then gelu(gate) * hidden: in eager mode the
  largest elementwise work of the step, forward and backward) compiled, a small region with two shapes in SDXL,
  for a short compile;
- norms_bf16: GroupNorm and LayerNorm emit the compute dtype (flatlora_diffusion/norms.py, the trainer's
  --bf16_norms). On CUDA, autocast runs both in fp32 and returns fp32, which every consumer casts back to bf16
  (up to six casts of one norm output: q, k, v and their LoRA inputs), and their gradients come back as fp32;
  here a norm takes bf16 and returns bf16 (its statistics still accumulate in fp32 inside the kernel). A numerics
  change, not bitwise: each row's `first_loss` is the loss of its first step (same batch, same diffusion noise)
  for comparison with the baseline's.
- fused_lora: peft's LoRA Linear layers add their up projection onto the base output inside one cuBLAS addmm
  (flatlora_diffusion/fused_lora.py) instead of an up-projection matmul, an activation-sized multiply by the scaling
  and an activation-sized add (and the scaling's multiply in the backward). A numerics change within one bf16
  rounding (first_loss).

Variants combine with "+", applied left to right (e.g. compile_blocks+norms_bf16).

Per variant and batch: median step ms over --n steps (CUDA events), MFU = FLOPs of the step (torch.utils.
flop_counter on the eager baseline step, once per batch) / (median time x 989.4 TFLOP/s, H100/H200 dense bf16),
GPU time per kernel class (e2e_profile.KERNEL_CLASSES; LoRA's small matmuls count as "gemm") of one replay, and
peak memory. With --lora-matmuls (or --op-table), not for the compiled variants: lora_matmul_ms and
lora_matmul_ops, the GPU time (CPU time on a CPU) and number of the LoRA layers' own matmuls (lora_A and lora_B,
forward and backward; the comment above GEMM_OPS says how they are told apart) in one profiled eager
step. kernel_classes_ms's gemm still includes them: lora_matmul_ms is the eager step's figure for them, the same
GEMMs as the replay's but timed outside the graph. A variant that fails is recorded with its error; one not started
before --time-limit seconds is recorded as skipped. The frozen weights are checked bitwise unchanged at the end
(exit status 1 if not). Writes DIR/results.json and prints one line per (variant, batch). --table prints results
files' rows as one markdown table instead (nothing else runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flat import (CHECKS, PEAK_BF16_TFLOPS, attach_engine, build, check_frozen, frozen_snapshot,  # noqa: E402
                        kernel_times_us, make_batch, step_flops)
from e2e_profile import kernel_class  # noqa: E402

from flatlora_diffusion import compiled_blocks  # noqa: E402
from flatlora_diffusion.forward_switch import forwards_patched  # noqa: E402
from flatlora_diffusion.fused_lora import fused_lora_forwards  # noqa: E402
from flatlora_diffusion.norms import norm_forwards  # noqa: E402

VARIANTS = ["baseline", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "channels_last", "no_input_cast", "compile",
            "compile_blocks", "compile_transformers", "compile_geglu", "norms_bf16", "fused_lora"]
# Regions compiled alone by compile_blocks (the trainer's --torch_compile) / compile_transformers (diffusers' class
# names in SD 1.x and SDXL UNets).
COMPILED_REGIONS = {"compile_blocks": compiled_blocks.REGIONS,
                    "compile_transformers": ("Transformer2DModel", "ResnetBlock2D"),
                    "compile_geglu": ("GEGLU",)}


def unknown_variants(variants: list[str]) -> list[str]:
    """The parts of "+"-combined variants that are not in VARIANTS."""
    return sorted({part for v in variants for part in v.split("+")} - set(VARIANTS))


@contextlib.contextmanager
def applied(variant: str, unet, batch):
    """The variant's change (or "+"-combined changes) in force inside the block, and undone after it."""
    if "+" in variant:
        with contextlib.ExitStack() as stack:
            for part in variant.split("+"):
                stack.enter_context(applied(part, unet, batch))
            yield
        return
    if variant.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[variant]
        with sdpa_kernel([backend]):
            yield
    elif variant == "channels_last":
        latents = batch.latents
        unet.to(memory_format=torch.channels_last)
        batch.latents = latents.contiguous(memory_format=torch.channels_last)
        try:
            yield
        finally:
            unet.to(memory_format=torch.contiguous_format)
            batch.latents = latents
    elif variant == "no_input_cast":
        from peft.helpers import disable_input_dtype_casting

        with disable_input_dtype_casting(unet):  # bf16 activations into the fp32 LoRA matrices, autocast does the rest
            yield
    elif variant == "compile":
        unet.forward = torch.compile(unet.forward, dynamic=False)  # an instance attribute shadows the method
        try:
            yield
        finally:
            del unet.forward
            torch._dynamo.reset()
    elif variant in COMPILED_REGIONS:
        compiled_blocks.compile_unet_blocks(unet, COMPILED_REGIONS[variant])
        try:
            yield
        finally:
            compiled_blocks.uncompile_unet_blocks(unet)
    elif variant == "norms_bf16":  # the trainer's --bf16_norms (its step does this inside loss_and_backward)
        with forwards_patched(norm_forwards(unet)):
            yield
    elif variant == "fused_lora":  # fused_lora.py's layers
        with forwards_patched(fused_lora_forwards([unet])):
            yield
    else:
        yield


def kernel_classes_ms(times_us: dict) -> dict:
    out: dict[str, float] = {}
    for name, (_, us) in times_us.items():
        cls = kernel_class(name)
        out[cls] = out.get(cls, 0.0) + us / 1e3
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def profiled(fn, cuda: bool):
    """torch.profiler's record of one call of `fn` (an eager step), with input shapes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return prof


def op_table(prof, top: int, cuda: bool) -> list[dict]:
    """The `top` aten ops of one profiled call by their own GPU time (CPU time on a CPU), grouped by input shapes:
    which op (and tensor) each kernel class's time belongs to, e.g. the layout copies."""
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0 and evt.key.startswith("aten::"):
            rows.append({"op": evt.key, "input_shapes": str(evt.input_shapes)[:300], "count": evt.count,
                         "self_ms": round(us / 1e3, 3)})
    return sorted(rows, key=lambda r: -r["self_ms"])[:top]


# --- LoRA's small matmuls in an eager step ---------------------------------------------------------------------
# Kernel names cannot tell them from the UNet's own GEMMs, and neither can shapes alone: a GEMM of a LoRA layer of
# rank r has r as one of its dimensions (x A^T, h B^T forward; dh A, dh^T x, g B, g^T h backward), but so does
# any GEMM whose token or batch dimension happens to equal r (the tiny 64 px SDXL's 4x4 latents: 16 tokens, and
# rank 16; a batch of 16 in the time embedding's Linear layers). So the GEMMs are attributed by where they run:
# - forward: inside a LoRA layer's forward but not inside its base layer's (profiler ranges put there by hooks);
# - backward: inside the autograd engine's evaluation of a node made by a forward op so placed, matched by the
#   profiler's sequence numbers. An op that makes no node (a no-op .to(), anything on tensors without grad)
#   records the number the next node will get, e.g. a LoRA layer's last .to() the next layer's base GEMM's: the
#   node's maker is the last forward op to start with its number. Numbers are unique per forward thread; the
#   step runs its forward on one.
# The rank in the GEMM's input shapes is then only a check. Flat-LoRA's perturbed forward runs inside the base
# layer: not counted.
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"})  # Linear, matmul, fused_lora
LORA_RANGE, BASE_RANGE = "mfu::lora_layer", "mfu::lora_base_layer"
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_ranks(model) -> set[int]:
    """The ranks of the active adapters of `model`'s LoRA layers (bench_flat.build's rank in this script)."""
    return {layer.r[name] for layer in lora_layers(model) for name in layer.active_adapters if name in layer.r}


def _ranged(module, name: str) -> list:
    """Hooks that open a profiler range `name` around each forward of `module` (and close it on an error too)."""
    opened = []

    def enter(mod, args):
        opened.append(torch.autograd.profiler.record_function(name).__enter__())

    def leave(mod, args, out):
        opened.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


@contextlib.contextmanager
def lora_ranges(model):
    """Inside the block, each LoRA layer's forward runs in a LORA_RANGE profiler range and its base layer's in a
    BASE_RANGE one: what lora_matmuls attributes the GEMMs by. Costs a host-side record per layer call."""
    handles = []
    for layer in lora_layers(model):
        handles += _ranged(layer, LORA_RANGE) + _ranged(layer.get_base_layer(), BASE_RANGE)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _by_start(events) -> list:
    return sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end))


def _split(events):
    """([(forward event, whether it runs in a LoRA layer's own forward)] in start order, parents first; the
    backward engine's node evaluations). "Forward" is everything outside the backward: the optimizer's ops too."""
    forward, backward = [], []
    roots = (e for e in events if e.cpu_parent is None and e.device_type == DeviceType.CPU and not e.is_async)
    stack = [(evt, False) for evt in reversed(_by_start(roots))]  # not the GPU's copies of the ranges
    while stack:
        evt, in_lora = stack.pop()
        if evt.name.startswith(BACKWARD_NODE):
            backward.append(evt)
            continue
        in_lora = {LORA_RANGE: True, BASE_RANGE: False}.get(evt.name, in_lora)
        forward.append((evt, in_lora))
        stack.extend((child, in_lora) for child in reversed(_by_start(evt.cpu_children)))
    return forward, backward


def _descendants(evt):
    stack = list(evt.cpu_children)
    while stack:
        child = stack.pop()
        yield child
        stack.extend(child.cpu_children)


def _has_rank(evt, ranks: set[int]) -> bool:
    return any(dim in ranks for shape in evt.input_shapes for dim in shape)


def lora_gemm_events(events, ranks: set[int]) -> list:
    """The GEMM events of the LoRA layers' matmuls among the events of one call run inside lora_ranges, forward
    and backward (the rule above)."""
    forward, backward = _split(events)
    made_in_lora = {}
    for evt, in_lora in forward:  # the last to start with a number made its node
        if evt.sequence_nr >= 0:
            made_in_lora[evt.sequence_nr] = in_lora
    gemms = [evt for evt, in_lora in forward if in_lora and evt.name in GEMM_OPS]
    gemms += [child for node in backward if made_in_lora.get(node.sequence_nr) for child in _descendants(node)
              if child.name in GEMM_OPS]
    return [evt for evt in gemms if _has_rank(evt, ranks)]


def lora_matmuls(events, ranks: set[int], cuda: bool) -> dict:
    """The LoRA layers' matmuls of one profiled call (lora_gemm_events): their own GPU time (CPU time on a CPU) in
    ms and their number, forward and backward."""
    gemms = lora_gemm_events(events, ranks)
    us = sum(evt.self_device_time_total if cuda else evt.self_cpu_time_total for evt in gemms)
    return {"lora_matmul_ms": round(us / 1e3, 3), "lora_matmul_ops": len(gemms)}


def time_steps(fn, n: int, warm: int, cuda: bool) -> list[float]:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def lora_step(arch, unet, sched, acc, device, tiny, bs, flat_sigma=0.0):
    """(the trainer's LoRA step on the UNet alone, a batch for it, its optimizer): fused AdamW on a GPU, as the
    trainer; with Flat-LoRA (constant schedule, the trainer's engine) when flat_sigma > 0."""
    from flatlora_diffusion.flat import FlatLoRA
    from flatlora_diffusion.step import StepModels, StepOptions, TrainStep

    batch = make_batch(arch, bs, device, tiny, with_te=False)
    params = [p for p in unet.parameters() if p.requires_grad]
    flat = (attach_engine(FlatLoRA([unet], sigma=flat_sigma, schedule="constant", total_steps=1000, seed=0), device)
            if flat_sigma > 0 else None)
    optimizer = acc.prepare_optimizer(torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda"))
    step = TrainStep(StepModels(unet=unet, text_encoders=[], noise_scheduler=sched, arch=arch), optimizer, params, acc,
                     StepOptions(seed=0, max_grad_norm=1.0, train_text_encoder=False), flat=flat)
    return step, batch, optimizer


def eager_profile(fn, unet, op_top: int, cuda: bool) -> dict:
    """One profiled eager step `fn` (run last: it sets the CUDA graph's gradient tensors to None): its LoRA
    matmuls' time and count, and its op table when op_top > 0."""
    with lora_ranges(unet):
        prof = profiled(fn, cuda)
    out = lora_matmuls(prof.events(), lora_ranks(unet), cuda)
    if op_top:
        out["eager_op_table"] = op_table(prof, op_top, cuda)
    return out


def run_variant(variant, arch, unet, sched, acc, device, tiny, bs, n, warm, flops, flat_sigma, op_top=0,
                lora_figures=False) -> dict:
    from flatlora_diffusion.graphed_step import GraphedTrainStep

    cuda = device.type == "cuda"
    step, batch, optimizer = lora_step(arch, unet, sched, acc, device, tiny, bs, flat_sigma)
    row = {"variant": variant, "batch": bs}
    with applied(variant, unet, batch):
        runner = GraphedTrainStep(step) if cuda else step
        counter = [0]

        def fn():
            counter[0] += 1
            return runner(batch, counter[0])

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = fn()[0]  # warm-up and capture (and compilation)
        if cuda:
            torch.cuda.synchronize()
        row["first_step_s"] = round(time.perf_counter() - t0, 1)
        row["first_loss"] = round(float(loss), 6)
        ms = time_steps(fn, n, warm, cuda)
        row["median_ms"] = round(statistics.median(ms), 2)
        row["spread_ms"] = [round(min(ms), 2), round(max(ms), 2)]
        if flops:
            row["mfu"] = round(flops / (row["median_ms"] / 1e3) / (PEAK_BF16_TFLOPS * 1e12), 4)
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            times = kernel_times_us(fn)
            row["kernel_ms"] = round(sum(us for _, us in times.values()) / 1e3, 2)
            row["kernel_classes_ms"] = kernel_classes_ms(times)
        if (op_top or lora_figures) and "compile" not in variant:
            row.update(eager_profile(lambda: step(batch, counter[0] + 1), unet, op_top, cuda))
    optimizer.zero_grad(set_to_none=True)
    return row


# --- --table: a results file as markdown ----------------------------------------------------------------------
TABLE_CLASSES = ("gemm", "attention", "convolution", "norm", "copy", "elementwise/other", "optimizer", "flat_lora")
TABLE_HEADER = (["variant", "batch", "median ms", "MFU %", "peak GiB", "first step s"]
                + [f"{cls} ms" for cls in TABLE_CLASSES] + ["LoRA matmuls ms (eager)"])


def _cell(value) -> str:
    return "" if value is None else str(value)


def table_cells(row: dict) -> list[str]:
    """A timed row's cells, in TABLE_HEADER's order ("" where the row has no such figure, e.g. on a CPU)."""
    classes = row.get("kernel_classes_ms", {})
    mfu = row.get("mfu")
    return ([row["variant"], _cell(row["batch"]), _cell(row["median_ms"]),
             "" if mfu is None else f"{100 * mfu:.1f}", _cell(row.get("peak_gib")), _cell(row.get("first_step_s"))]
            + [_cell(classes.get(cls)) for cls in TABLE_CLASSES] + [_cell(row.get("lora_matmul_ms"))])


def untimed_reason(row: dict) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "error" in row:
        error = str(row["error"]).splitlines()[0] if row["error"] else ""
        return f"error: {error[:200]}"
    return "no timings"


def markdown_table(records: list[tuple[str, dict]]) -> str:
    """One markdown table of the timed rows of (name, results.json record) pairs (a first column naming the file
    when there are several), then a list of the rows without timings and why."""
    several = len(records) > 1
    header = (["results"] if several else []) + TABLE_HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    untimed = []
    for name, record in records:
        for row in record["rows"]:
            if "median_ms" in row:
                lines.append("| " + " | ".join(([name] if several else []) + table_cells(row)) + " |")
            else:
                untimed.append(f"- {name + ': ' if several else ''}{row.get('variant')}, batch {row.get('batch')}: "
                               f"{untimed_reason(row)}")
    return "\n".join(lines + ([""] + untimed if untimed else []))


def read_record(path: str) -> dict:
    """A results.json record; ValueError with one line saying why it cannot be read as one."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ValueError(f"cannot read {path}: not a mfu_candidates.py results file (no list of rows)")
    return record


def print_table(paths: list[str]) -> int:
    try:
        records = [(Path(path).stem, read_record(path)) for path in paths]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(records))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="Directory for results.json (required unless --table).")
    ap.add_argument("--table", nargs="+", metavar="RESULTS_JSON",
                    help="Only print these results files' timed rows as one markdown table (no model is built).")
    ap.add_argument("--arch", default="sdxl", choices=["sdxl", "sd15"])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=480.0, help="Start no variant after this many seconds.")
    ap.add_argument("--flat", type=float, default=0.0, metavar="SIGMA",
                    help="Time the step with Flat-LoRA at this sigma (MFU stays relative to the LoRA step's FLOPs).")
    ap.add_argument("--op-table", type=int, default=0, metavar="N",
                    help="Also profile one eager step per row (not the compiled variants'): its N aten ops with the "
                         "most GPU time, by input shape (and --lora-matmuls' figures, from the same profile).")
    ap.add_argument("--lora-matmuls", action="store_true",
                    help="Also profile one eager step per row (not the compiled variants'): its LoRA layers' matmuls' "
                         "GPU time and count (lora_matmul_ms, lora_matmul_ops).")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.table:
        return print_table(args.table)
    if not args.out:
        print("error: --out DIR is required (or --table RESULTS_JSON ... to print results as a table)",
              file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    unknown = unknown_variants(variants)
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from accelerate import Accelerator

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    acc = Accelerator(mixed_precision="bf16", cpu=not cuda)  # bf16 autocast on the CPU too (smoke runs)
    started = time.perf_counter()
    record = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "arch": args.arch, "argv": sys.argv[1:], "peak_tflops": PEAK_BF16_TFLOPS, "flat_sigma": args.flat,
              "rows": []}
    unet, tes, sched = build(args.arch, device, args.tiny)
    del tes
    snapshot = frozen_snapshot([unet])
    # Every variant starts from the same LoRA weights, so that the rows' first_loss differ by the variant alone.
    trained = [p for p in unet.parameters() if p.requires_grad]
    lora_start = [p.detach().clone() for p in trained]
    for bs in [int(b) for b in args.batches.split(",")]:
        eager, batch, _ = lora_step(args.arch, unet, sched, acc, device, args.tiny, bs)
        flops = step_flops(lambda: eager(batch, 1)) if cuda else None
        record.setdefault("flops", {})[str(bs)] = flops
        for variant in variants:
            if time.perf_counter() - started > args.time_limit:
                row = {"variant": variant, "batch": bs, "skipped": "time limit"}
            else:
                with torch.no_grad():
                    torch._foreach_copy_(trained, lora_start)
                try:
                    row = run_variant(variant, args.arch, unet, sched, acc, device, args.tiny, bs, args.n, args.warm,
                                      flops, args.flat, args.op_table, args.lora_matmuls)
                except Exception as exc:  # one failing candidate must not lose the others' figures
                    traceback.print_exc()
                    row = {"variant": variant, "batch": bs, "error": repr(exc)[:1500]}
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            record["elapsed_s"] = round(time.perf_counter() - started, 1)
            (out / "results.json").write_text(json.dumps(record, indent=1))
    check_frozen(args.arch, [unet], snapshot)
    frozen_ok = CHECKS[-1]["ok"]
    record["frozen_weights_unchanged"] = frozen_ok
    (out / "results.json").write_text(json.dumps(record, indent=1))
    return 0 if frozen_ok else 1


if __name__ == "__main__":
    sys.exit(main())
