#!/usr/bin/env python3
"""MFU of the LoRA training step and what each candidate change buys (issue 20, part 3).

    python benchmarks/mfu_candidates.py --out DIR [--arch sdxl] [--batches 1,4] [--n 10] [--warm 3]
        [--variants baseline,sdpa_flash,sdpa_cudnn,sdpa_efficient,channels_last,no_input_cast,compile,
                    compile_blocks,compile_transformers,compile_geglu,norms_bf16,fused_lora,
                    compile_blocks+norms_bf16]
        [--time-limit 480]
    python benchmarks/mfu_candidates.py --tiny --device cpu --out /tmp/m   # smoke test of this script

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
peak memory. A variant that fails is recorded with its error; one not started before --time-limit seconds is
recorded as skipped. The frozen weights are checked bitwise unchanged at the end (exit status 1 if not).
Writes DIR/results.json and prints one line per (variant, batch).
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


def op_table(fn, top: int, cuda: bool) -> list[dict]:
    """The `top` aten ops of one call by their own GPU time (CPU time on a CPU), grouped by input shapes: which op
    (and tensor) each kernel class's time belongs to, e.g. the layout copies."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0 and evt.key.startswith("aten::"):
            rows.append({"op": evt.key, "input_shapes": str(evt.input_shapes)[:300], "count": evt.count,
                         "self_ms": round(us / 1e3, 3)})
    return sorted(rows, key=lambda r: -r["self_ms"])[:top]


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


def run_variant(variant, arch, unet, sched, acc, device, tiny, bs, n, warm, flops, flat_sigma, op_top=0) -> dict:
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
        if op_top and "compile" not in variant:  # an eager step, last: it sets the graph's gradient tensors to None
            row["eager_op_table"] = op_table(lambda: step(batch, counter[0] + 1), op_top, cuda)
    optimizer.zero_grad(set_to_none=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="sdxl", choices=["sdxl", "sd15"])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=480.0, help="Start no variant after this many seconds.")
    ap.add_argument("--flat", type=float, default=0.0, metavar="SIGMA",
                    help="Time the step with Flat-LoRA at this sigma (MFU stays relative to the LoRA step's FLOPs).")
    ap.add_argument("--op-table", type=int, default=0, metavar="N",
                    help="Also profile one eager step per row (not the compiled variants'): its N aten ops with the most "
                         "GPU time, by input shape.")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
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
                                      flops, args.flat, args.op_table)
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
