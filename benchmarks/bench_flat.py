#!/usr/bin/env python3
"""GPU benchmark of the project's training step: plain LoRA vs Flat-LoRA, full-size random-weight models.

    python benchmarks/bench_flat.py --out results/            # everything (SDXL + SD 1.5), ~8 min on an H200
    python benchmarks/bench_flat.py --archs sd15 --out r/     # one architecture
    python benchmarks/bench_flat.py --merge a.json b.json --out r/   # one table from several runs
    python benchmarks/bench_flat.py --tiny --device cpu --out /tmp/b  # smoke test of this script on a CPU
    python benchmarks/bench_flat.py --archs sdxl --batches 1 --modes graph --skip-checks \
        --compare evict_first=False --out r/   # A/B of one fast-engine setting, paired in one process

What it times is flatlora_diffusion.step.TrainStep (the trainer's step: embeddings or text encoders, noise,
UNet, loss, backward, clipping, AdamW, through accelerate with bf16 autocast, frozen weights in bf16, LoRA in
fp32) and graphed_step.GraphedTrainStep (the same step with forward + backward replayed from a CUDA graph).
LoRA r = alpha = 16 on to_q/to_k/to_v/to_out.0 (UNet) and q/k/v/out_proj (text encoders), Flat-LoRA sigma 0.1
(constant schedule, so every timed step is perturbed).

Per configuration (arch x targets x batch x gradient checkpointing x eager/graph):
- median step time from CUDA events (synchronised before each step, so it is the step's wall time on the
  GPU timeline) after warm-up, LoRA and Flat-LoRA alternating in one process (ABBA order);
- GPU kernel time of one step (torch.profiler, sum of device time), wall / kernel, MFU;
- peak memory (eager steps; graph mode holds its pool, shared by both variants);
- Flat/LoRA ratios: median of the per-pair ratios of step time, kernel time ratio, peak memory ratio.
Before timing it runs the equivalence checks of the fast path against the reference path and the torch
emulation (GPU), and at the end checks that every frozen weight is bitwise unchanged. Any failed check
makes the exit status 1 (after the results are written) and is printed as FAIL.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlora_diffusion.config import TrainConfig  # noqa: E402
from flatlora_diffusion.flat import FlatLoRA, fused  # noqa: E402
from flatlora_diffusion.graphed_step import GraphedTrainStep  # noqa: E402

SDXL_TFLOP_BS1 = 14.6  # per SDXL 1024 px batch-1 step with r=16 attention LoRA (shared/facts/flat-lora.md)
PEAK_BF16_TFLOPS = 989.4  # H200 SXM dense bf16, datasheet
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CHECKS: list[dict] = []


def check(name: str, ok: bool, **detail) -> bool:
    CHECKS.append({"check": name, "ok": bool(ok), **{k: _jsonable(v) for k, v in detail.items()}})
    print(("ok   " if ok else "FAIL ") + name + " " + json.dumps(CHECKS[-1], default=str)[:400], flush=True)
    return ok


def _jsonable(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def unet_config(arch: str, tiny: bool) -> dict:
    if tiny:
        cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        if arch == "sdxl":
            cfg.update(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                       projection_class_embeddings_input_dim=6 * 8 + 32)
        return cfg
    if arch == "sdxl":
        return dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def te_configs(arch: str, tiny: bool):
    from transformers import CLIPTextConfig

    if tiny:
        one = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77)
        return [CLIPTextConfig(**one)] + ([CLIPTextConfig(**one, projection_dim=32)] if arch == "sdxl" else [])
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77)
    if arch != "sdxl":
        return [clip_l]
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, hidden_act="gelu", max_position_embeddings=77, projection_dim=1280)
    return [clip_l, big_g]


def build(arch: str, device: torch.device, tiny: bool, rank: int = 16):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from flatlora_diffusion.models import add_lora, lora_config

    t0 = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(arch, tiny))
        cfgs = te_configs(arch, tiny)
        tes = [CLIPTextModel(cfgs[0])] + ([CLIPTextModelWithProjection(cfgs[1])] if len(cfgs) > 1 else [])
    unet.to(dtype)
    for te in tes:
        te.to(dtype)
    add_lora(unet, lora_config(rank, rank, UNET_TARGETS, 0.0, False, False, "gaussian"))
    for te in tes:
        add_lora(te, lora_config(rank, rank, TE_TARGETS, 0.0, False, False, "gaussian"))
    gen = torch.Generator(device=device).manual_seed(1)
    for model in [unet] + tes:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # as the trainer: LoRA trains in fp32
                if "lora_B" in name:  # peft starts B at 0; give W' = W + sBA a real LoRA part
                    p.data.normal_(0.0, 0.02, generator=gen)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"built {arch}{' tiny' if tiny else ''}: UNet {n_params / 1e9:.3f} B params, "
          f"{len(tes)} text encoders, {time.perf_counter() - t0:.1f} s", flush=True)
    return unet, tes, sched


def make_batch(arch, bs, device, tiny, with_te):
    from flatlora_diffusion.step import StepBatch

    g = torch.Generator(device=device).manual_seed(bs)
    side = 8 if tiny else (128 if arch == "sdxl" else 64)
    latents = torch.randn(bs, 4, side, side, generator=g, device=device).to(torch.bfloat16)
    if with_te:
        n_te = 2 if arch == "sdxl" else 1
        vocab = 1000 if tiny else 49408
        ids = [torch.randint(0, vocab - 2, (bs, 77), generator=g, device=device) for _ in range(n_te)]
        for i in ids:
            i[:, 0] = vocab - 2
            i[:, 20:] = vocab - 1
        batch = StepBatch(latents=latents, input_ids=ids)
    else:
        dim = (64 if tiny else 2048) if arch == "sdxl" else (32 if tiny else 768)
        batch = StepBatch(latents=latents,
                          prompt_embeds=torch.randn(bs, 77, dim, generator=g, device=device).to(torch.bfloat16))
        if arch == "sdxl":
            batch.pooled_prompt_embeds = torch.randn(bs, 32 if tiny else 1280, generator=g, device=device).to(torch.bfloat16)
    if arch == "sdxl":
        res = 64 if tiny else 1024
        batch.time_ids = torch.tensor([[res, res, 0, 0, res, res]] * bs, device=device, dtype=torch.bfloat16)
    return batch


def set_checkpointing(unet, tes, on: bool, with_te: bool):
    if on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    for te in tes:
        if on and with_te:
            te.gradient_checkpointing_enable()
        else:
            te.gradient_checkpointing_disable()


def attach_engine(flat: FlatLoRA, device: torch.device):
    """The trainer's default (backend auto) on CUDA; on a CPU smoke test the torch-kernel fast engine."""
    if device.type != "cuda":
        flat._fast = fused.FastFlat(flat, kernels="torch")
    return flat


# --------------------------------------------------------------------------------------------------------------
# equivalence checks (fast path vs reference path / emulation), on the GPU
# --------------------------------------------------------------------------------------------------------------


def row_law(eps: torch.Tensor, expected_std: torch.Tensor) -> dict:
    e = eps.reshape(eps.shape[0], -1).double()
    n = e.shape[1]
    z = e / expected_std.double()[:, None]
    stats = dict(max_row_mean=z.mean(1).abs().max().item(), mean_bound=6 / math.sqrt(n),
                 max_row_std_dev=(z.std(1) - 1).abs().max().item(), std_bound=6 / math.sqrt(2 * n),
                 pooled_std=z.std().item(), pooled_bound=6 / math.sqrt(2 * z.numel()),
                 kurtosis=((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2,
                 kurtosis_bound=6 * math.sqrt(24 / z.numel()))
    stats["ok"] = (stats["max_row_mean"] < stats["mean_bound"] and stats["max_row_std_dev"] < stats["std_bound"]
                   and abs(stats["pooled_std"] - 1) < stats["pooled_bound"] and abs(stats["kurtosis"] - 3) < stats["kurtosis_bound"])
    return stats


def expected_std(layer, sigma_t):
    lora = layer.lora_layer
    w = layer.base.weight.detach().double()
    for a in lora.active_adapters:
        w = w + lora.get_delta_weight(a).detach().double()
    return w.reshape(w.shape[0], -1).norm(dim=1) * sigma_t / math.sqrt(w[0].numel())


def fp8_twin(unet):
    """A copy of `unet` with its frozen weights stored in float8, as --low_memory stores them (fp8_storage.py)."""
    from flatlora_diffusion.fp8_storage import store_frozen_weights_in_fp8

    twin = copy.deepcopy(unet)
    store_frozen_weights_in_fp8(twin, torch.bfloat16)
    return twin


def check_engine_against_reference(tag: str, models, device, sample_layers=6):
    """Keys, noise scales, eps law, Triton vs torch emulation, on real full-size layers."""
    flat = attach_engine(FlatLoRA(models, sigma=0.1, schedule="constant", seed=1234), device)
    ref = FlatLoRA(models, sigma=0.1, schedule="constant", seed=1234, backend="reference")
    eng = flat.fast_engine()
    step = 77
    eng.begin_step(step, 0)
    keys_ok = eng._keys.tolist() == [ref.key(lay, step) for lay in ref.layers]
    check(f"{tag}: device keys == flat.noise_key for all {len(ref.layers)} layers", keys_ok)
    emu = fused.FastFlat(flat, kernels="torch")
    emu.begin_step(step, 0)
    idx = sorted({round(i * (len(eng.chunks) - 1) / max(sample_layers - 1, 1)) for i in range(sample_layers)})
    worst = dict(std_vs_ref=0.0, std_vs_emu=0.0, z_vs_emu=0.0, z_frac_over_1e4=0.0, w_excess=0.0, w_mismatch=0.0)
    laws_fast, laws_ref = [], []
    for ci in idx:
        chunk = eng.chunks[ci]
        buf_fast = torch.empty(chunk.numel, dtype=torch.float32, device=device)
        buf_emu = torch.empty_like(buf_fast)
        eng._generate(chunk, buf_fast, add_w=False)
        emu._generate(emu.chunks[ci], buf_emu, add_w=False)
        wb_fast = torch.empty(chunk.numel, dtype=torch.bfloat16, device=device)
        wb_emu = torch.empty_like(wb_fast)
        eng._generate(chunk, wb_fast, add_w=True)
        emu._generate(emu.chunks[ci], wb_emu, add_w=True)
        for fl in chunk.layers:
            lay = fl.flat_layer
            s_fast = eng._std[fl.std_offset: fl.std_offset + fl.rows]
            s_emu = emu._std[fl.std_offset: fl.std_offset + fl.rows]
            s_ref = ref.row_std(lay, 0.1)  # the reference engine's own (fp32) noise scale
            worst["std_vs_ref"] = max(worst["std_vs_ref"], ((s_fast - s_ref).abs() / s_ref).max().item())
            worst["std_vs_emu"] = max(worst["std_vs_emu"], ((s_fast - s_emu).abs() / s_emu).max().item())
            e_fast = buf_fast[fl.offset: fl.offset + fl.numel].view(fl.rows, -1)
            e_emu = buf_emu[fl.offset: fl.offset + fl.numel].view(fl.rows, -1)
            # compared as standard normals (each side's eps over its own noise scale): the rounding of the
            # kernel's noise scale (checked above) must not hide or fake a generator difference
            dz = (e_fast / s_fast[:, None] - e_emu / s_emu[:, None]).abs()
            worst["z_vs_emu"] = max(worst["z_vs_emu"], dz.max().item())
            worst["z_frac_over_1e4"] = max(worst["z_frac_over_1e4"], (dz > 1e-4).float().mean().item())
            a = wb_fast[fl.offset: fl.offset + fl.numel].view(fl.rows, -1).float()
            b = wb_emu[fl.offset: fl.offset + fl.numel].view(fl.rows, -1).float()
            w = fl.weight.detach().reshape(fl.rows, -1).float()
            # one bf16 rounding step of the sum, what the z difference itself allows, and the fp32 rounding of
            # std * z + W (the kernel fuses it into one FMA, the emulation rounds the product first: where W and
            # eps nearly cancel, that alone can flip the sign of a tiny sum)
            allowed = (torch.maximum(a.abs(), b.abs()) * 2.0**-7 + (e_fast - e_emu).abs()
                       + (e_emu.abs() + w.abs()) * 2.0**-23 + 1e-30)
            excess = (a - b).abs() / allowed
            k = int(excess.argmax())
            if excess.view(-1)[k].item() > worst["w_excess"]:
                worst["w_excess"] = excess.view(-1)[k].item()
                worst["w_excess_at"] = {n: v.view(-1)[k].item() for n, v in
                                        (("fast", a), ("emu", b), ("eps_fast", e_fast), ("eps_emu", e_emu), ("w", w))}
            worst["w_mismatch"] = max(worst["w_mismatch"], (a != b).float().mean().item())
        # the law, for the chunk's first layer, fast path vs reference path (torch.Generator noise)
        lay = chunk.layers[0].flat_layer
        exp = expected_std(lay, 0.1)
        e0 = buf_fast[: chunk.layers[0].numel].view(chunk.layers[0].rows, -1)
        laws_fast.append(row_law(e0, exp))
        laws_ref.append(row_law(ref.noise(lay, step), exp))
    # the expansion kernel (commit c63a6ac) agrees to <= 3.6e-7; the direct tf32 B A kernel before it to 5.2e-4
    check(f"{tag}: kernel noise scale == reference row_std (rel < 1e-5)", worst["std_vs_ref"] < 1e-5,
          worst=worst["std_vs_ref"])
    # z: the kernel uses the approximate lg2/sin/cos; near u1 = 1 (r ~ 0, probability ~1e-8) lg2.approx's
    # absolute error shows as up to ~1e-3 in z. Bulk agreement: < 1e-5 of the entries differ by > 1e-4.
    check(f"{tag}: Triton kernel == torch emulation (std rel < 2e-3; z: max < 1e-2, >1e-4 in < 1e-5 of entries; "
          "W+eps: within one bf16 rounding)",
          worst["std_vs_emu"] < 2e-3 and worst["z_vs_emu"] < 1e-2 and worst["z_frac_over_1e4"] < 1e-5
          and worst["w_excess"] <= 1.0, **worst)
    check(f"{tag}: eps law of the fast path (6-sigma row/pooled bounds, kurtosis 3)", all(x["ok"] for x in laws_fast),
          laws=laws_fast)
    check(f"{tag}: eps law of the reference path, same test", all(x["ok"] for x in laws_ref), laws=laws_ref)
    eng.end_step()
    return flat


def check_gradients(device, tiny: bool):
    """Gradients of the fast path == the fp32 computation with its eps materialised; checkpointing sees the
    same eps. On a full-size SD 1.5 UNet in fp32 (256 px) unless tiny."""
    from diffusers import UNet2DConditionModel

    from flatlora_diffusion.models import add_lora, lora_config

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (cuDNN defaults to TF32 convolutions)
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config("sd15", tiny))
    add_lora(unet, lora_config(8, 8, UNET_TARGETS, 0.0, False, False, "gaussian"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    unet.train()
    flat = attach_engine(FlatLoRA(unet, sigma=0.1, schedule="constant", seed=3), device)
    g = torch.Generator(device=device).manual_seed(0)
    side = 8 if tiny else 32
    sample = torch.randn(2, 4, side, side, generator=g, device=device)
    text = torch.randn(2, 77, 32 if tiny else 768, generator=g, device=device)
    t = torch.tensor([10, 500], device=device)

    def grads():
        return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}

    def run(ckpt):
        unet.zero_grad(set_to_none=True)
        unet.enable_gradient_checkpointing() if ckpt else unet.disable_gradient_checkpointing()
        with flat.perturb(5):
            unet(sample, t, text).sample.float().pow(2).mean().backward()
        return grads()

    plain = run(False)
    ckpt = run(True)
    unet.disable_gradient_checkpointing()
    eps = {lay.name: flat.noise(lay, 5) for lay in flat.layers}
    unet.zero_grad(set_to_none=True)
    for lay in flat.layers:
        base, e = lay.base, eps[lay.name]
        base.forward = (lambda b, e: (lambda x: F.linear(x, b.weight + e, b.bias)))(base, e)
    try:
        unet(sample, t, text).sample.float().pow(2).mean().backward()
    finally:
        for lay in flat.layers:
            del lay.base.forward
    ref = grads()

    def rel(a, b):
        return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b)

    check("gradients: fast path == fp32 reference with the fast path's eps materialised (rel < 1e-4)",
          rel(plain, ref) < 1e-4, rel=rel(plain, ref), n_grads=len(ref))
    check("gradients: with gradient checkpointing == without (recomputation sees the same eps; rel < 1e-4)",
          rel(ckpt, plain) < 1e-4, rel=rel(ckpt, plain))
    clean = {}
    unet.zero_grad(set_to_none=True)
    unet(sample, t, text).sample.float().pow(2).mean().backward()
    clean = grads()
    check("gradients: the noise matters (clean gradients differ by > 1e-3)", rel(clean, plain) > 1e-3,
          rel=rel(clean, plain))
    del unet, flat
    torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def kernel_times_us(fn) -> dict:
    """Device time (us) and count of each GPU activity, by name, of one call (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0))
        if us > 0:
            out[evt.key] = (evt.count, us)
    return out


def kernel_ms(times_us: dict) -> float | None:
    """Sum of device time of all GPU activities (kernel_times_us of one call), in ms."""
    total = sum(us for _, us in times_us.values())
    return total / 1e3 if total > 0 else None


def kernel_time_difference(a: dict, b: dict, top: int = 30) -> list:
    """Where Flat-LoRA's extra kernel time goes, from kernel_times_us of a LoRA (a) and a Flat-LoRA (b) step:
    per activity name, flat - lora device time and counts, the `top` largest absolute differences first."""
    rows = []
    for k in set(a) | set(b):
        (lora_n, lora_us), (flat_n, flat_us) = a.get(k, (0, 0)), b.get(k, (0, 0))
        rows.append({"kernel": k[:160], "lora_n": lora_n, "flat_n": flat_n, "lora_us": round(lora_us, 1),
                     "flat_us": round(flat_us, 1), "diff_us": round(flat_us - lora_us, 1)})
    rows.sort(key=lambda r: -abs(r["diff_us"]))
    return rows[:top]


def step_flops(fn) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception as exc:  # pragma: no cover
        print(f"flop count failed: {exc!r}", flush=True)
        return None


def time_variants(fns: dict, n: int, warm: int, device) -> dict:
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(warm):
            fn()
    if cuda:
        torch.cuda.synchronize()
    res = {k: {"ms": [], "host_ms": [], "peak": 0} for k in fns}
    names = list(fns)
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                h0 = time.perf_counter()
                e0.record()
                fns[name]()
                e1.record()
                torch.cuda.synchronize()
                res[name]["ms"].append(e0.elapsed_time(e1))
                res[name]["host_ms"].append((time.perf_counter() - h0) * 1e3)
                res[name]["peak"] = max(res[name]["peak"], torch.cuda.max_memory_allocated())
            else:
                h0 = time.perf_counter()
                fns[name]()
                res[name]["ms"].append((time.perf_counter() - h0) * 1e3)
    out = {k: {"median_ms": statistics.median(v["ms"]), "min_ms": min(v["ms"]), "max_ms": max(v["ms"]),
               "median_host_ms": statistics.median(v["host_ms"]) if v["host_ms"] else None,
               "peak_gib": v["peak"] / 2**30, "all_ms": v["ms"]} for k, v in res.items()}
    for k in names:  # "flat", and "flat_alt" where it ran: each against the LoRA step timed beside it
        if k != "lora":
            suffix = "" if k == "flat" else "_" + k
            pair = [f / p for f, p in zip(res[k]["ms"], res["lora"]["ms"])]
            out["ratio_paired_median" + suffix] = statistics.median(pair)
            out["ratio_of_medians" + suffix] = out[k]["median_ms"] / out["lora"]["median_ms"]
    return out


@contextlib.contextmanager
def engine_setting(eng, setting: str | None):
    """`setting` ("attribute=value", the value a Python literal) set on the fast engine inside the block."""
    if setting is None or eng is None:
        yield
        return
    name, _, value = setting.partition("=")
    before = getattr(eng, name)
    setattr(eng, name, ast.literal_eval(value))
    try:
        yield
    finally:
        setattr(eng, name, before)


def run_config(arch, unet, tes, sched, acc, device, tiny, targets, bs, ckpt, modes, n, warm, compare, *,
               bf16_norms: bool, fused_lora: bool):
    from flatlora_diffusion.step import StepModels, StepOptions, TrainStep

    with_te = targets == "unet+te"
    for te in tes:
        for name, p in te.named_parameters():
            p.requires_grad_(with_te and "lora_" in name)
    set_checkpointing(unet, tes, ckpt, with_te)
    trained = [unet] + (tes if with_te else [])
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = acc.prepare_optimizer(torch.optim.AdamW(params, lr=1e-5))
    options = StepOptions(seed=0, max_grad_norm=1.0, train_text_encoder=with_te, bf16_norms=bf16_norms,
                          fused_lora=fused_lora)
    models = StepModels(unet=unet, text_encoders=list(tes), noise_scheduler=sched, arch=arch)
    flat = attach_engine(FlatLoRA(trained, sigma=0.1, schedule="constant", total_steps=1000, seed=0), device)
    steps = {"lora": TrainStep(models, optimizer, params, acc, options, flat=None),
             "flat": TrainStep(models, optimizer, params, acc, options, flat=flat)}
    batch = make_batch(arch, bs, device, tiny, with_te)
    result = {"arch": arch, "targets": targets, "batch": bs, "checkpointing": ckpt, "flat_layers": len(flat.layers),
              "trained_params": sum(p.numel() for p in params)}
    counters = {"lora": 0, "flat": 0}

    def caller(step):
        def fn(name=None):
            key = "flat" if step.flat is not None else "lora"
            counters[key] += 1
            return step(batch, counters[key])
        return fn

    out = {}
    if "eager" not in modes and device.type == "cuda":  # peak memory of the eager step all the same
        fns = {k: caller(v) for k, v in steps.items()}
        peaks = {}
        for k in fns:
            fns[k]()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fns[k]()
            torch.cuda.synchronize()
            peaks[k] = torch.cuda.max_memory_allocated() / 2**30
        out["eager_peak_gib"] = peaks
    if "eager" in modes:
        fns = {k: caller(v) for k, v in steps.items()}
        out["eager"] = time_variants(fns, n, warm, device)
        eng = flat.fast_engine()
        if eng is not None:
            g0 = eng.generations
            fns["flat"]()
            out["eager"]["flat_generations_per_step"] = eng.generations - g0
            out["eager"]["flat_chunks"] = len(eng.chunks)
        if device.type == "cuda":
            for k in fns:
                out["eager"][k]["kernel_ms"] = kernel_ms(kernel_times_us(fns[k]))
            out["eager"]["flops"] = step_flops(fns["lora"])
    if "eager" not in modes and device.type == "cuda":
        result["flops"] = step_flops(caller(steps["lora"]))
    if "graph" in modes and device.type == "cuda":
        try:
            pool = torch.cuda.graph_pool_handle()
            variants = dict(steps)
            eng = flat.fast_engine()
            if compare and eng is not None:  # the same step captured with one engine setting changed
                variants["flat_alt"] = steps["flat"]
                out.setdefault("graph", {})["flat_alt_setting"] = compare
            graphed = {k: GraphedTrainStep(v, pool=pool) for k, v in variants.items()}
            fns = {k: caller(v) for k, v in graphed.items()}
            for k in fns:  # capture (counted apart from the timed steps)
                with engine_setting(eng, compare if k == "flat_alt" else None):
                    t0 = time.perf_counter()
                    fns[k]()
                    torch.cuda.synchronize()
                out.setdefault("graph", {})[f"{k}_capture_s"] = time.perf_counter() - t0
            out["graph"].update(time_variants(fns, n, warm, device))
            times = {k: kernel_times_us(fns[k]) for k in fns}  # one profiled step per variant serves both
            for k in fns:
                out["graph"][k]["kernel_ms"] = kernel_ms(times[k])
            out["graph"]["kernel_difference"] = kernel_time_difference(times["lora"], times["flat"])
            for row in out["graph"]["kernel_difference"][:12]:
                print(f"  flat - lora {row['diff_us']:8.1f} us  n {row['lora_n']}/{row['flat_n']}  {row['kernel'][:90]}",
                      flush=True)
            out["graph"]["memory_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
            del graphed, fns
        except Exception as exc:
            traceback.print_exc()
            out["graph"] = {"error": repr(exc)[:2000]}
    optimizer.zero_grad(set_to_none=True)
    result["modes"] = out
    del steps, flat, optimizer
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result


def check_graph_equals_eager(arch, unet, tes, sched, acc, device, tiny):
    """One graph replay of the step's forward + backward == the same computation run eagerly."""
    from flatlora_diffusion.step import StepModels, StepOptions, TrainStep, step_generator

    for te in tes:
        te.requires_grad_(False)
    set_checkpointing(unet, tes, False, False)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    flat = attach_engine(FlatLoRA([unet], sigma=0.1, schedule="constant", seed=0), device)
    ts = TrainStep(StepModels(unet, list(tes), sched, arch), optimizer, params, acc,
                   StepOptions(seed=0, max_grad_norm=None), flat=flat)
    gs = GraphedTrainStep(ts)
    batch = make_batch(arch, 1, device, tiny, False)
    graph, static, static_loss = gs._capture(batch)
    seed = step_generator(device, 0, 42, 0, 0).initial_seed()
    gs.gen.manual_seed(seed)
    gs.step_t.fill_(42)
    gs.micro_t.fill_(0)
    graph.replay()
    g_graph = [p.grad.clone() for p in params]
    loss_graph = static_loss.clone()
    runs = []
    for _ in range(2):  # the same body, eagerly, twice: run-to-run spread of bf16 kernels with atomics
        gs.gen.manual_seed(seed)
        loss_eager = gs._body(static)
        runs.append(([p.grad.clone() for p in params], loss_eager))

    def rel(ga, gb):
        return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(ga, gb))

    spread = rel(runs[0][0], runs[1][0])
    worst = rel(g_graph, runs[0][0])
    check(f"{arch}: graph replay of forward+backward == eager (same loss; grads within 3x the eager run-to-run "
          "spread + 1e-3)", worst <= 3 * spread + 1e-3 and abs(loss_graph.item() - runs[0][1].item()) < 1e-3,
          rel=worst, eager_spread=spread, loss_graph=loss_graph.item(), loss_eager=runs[0][1].item())
    optimizer.zero_grad(set_to_none=True)
    del gs, graph, static, ts, flat
    torch.cuda.empty_cache()


def frozen_snapshot(models):
    return {f"{i}.{n}": p.detach().to("cpu", copy=True) for i, m in enumerate(models)
            for n, p in m.named_parameters() if "lora_" not in n}


def check_frozen(tag, models, snap):
    bad = [k for k, v in frozen_snapshot(models).items() if not torch.equal(v, snap[k])]
    check(f"{tag}: every frozen weight bitwise unchanged after all steps ({len(snap)} tensors)", not bad, changed=bad[:5])


def kernel_microbench(tag, unet, device):
    """Flat-LoRA's own GPU work per step, alone, over all UNet layers: the noise-scale launch, and one noise
    pass (W + eps for every layer, one launch per chunk); ms and effective bandwidth."""
    out = {}
    for rounds in (10, 7):
        flat = FlatLoRA(unet, sigma=0.1, schedule="constant", seed=0)
        eng = fused.FastFlat(flat, kernels="triton", rounds=rounds)
        eng.begin_step(3, 0)
        bufs = [torch.empty(c.numel, dtype=torch.bfloat16, device=device) for c in eng.chunks]
        n_el = sum(c.numel for c in eng.chunks)

        def noise_pass():
            for c, b in zip(eng.chunks, bufs):
                eng._generate(c, b, add_w=True)

        for name, fn, nbytes in (("norms", eng._compute_norms, n_el * 2), ("noise", noise_pass, n_el * 4)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(10):
                fn()
            e1.record()
            torch.cuda.synchronize()
            ms = e0.elapsed_time(e1) / 10
            out[f"rounds{rounds}_{name}_ms"] = ms
            out[f"rounds{rounds}_{name}_GBps"] = nbytes / ms / 1e6
        out["elements"] = n_el
        out["chunks"] = len(eng.chunks)
        del bufs
    print(f"{tag} Flat-LoRA kernels alone: {json.dumps(out)}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    head = ("| model | trained | batch | ckpt | mode | LoRA ms | Flat ms | Flat/LoRA (paired median) | "
            "LoRA kernel ms | Flat kernel ms | kernel ratio | wall/kernel (LoRA) | LoRA peak GiB | Flat peak GiB | "
            "mem ratio | MFU (LoRA) |")
    lines = [head, "|" + "---|" * head.count("|")[:-1] if False else "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        flops = r.get("flops") or r["modes"].get("eager", {}).get("flops")
        for mode, m in r["modes"].items():
            if mode == "eager_peak_gib":
                continue
            if "error" in m:
                lines.append(f"| {r['arch']} | {r['targets']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} "
                             f"| {mode} | failed: {m['error'][:80]} |")
                continue
            lo, fl = m["lora"], m["flat"]
            lk, fk = lo.get("kernel_ms"), fl.get("kernel_ms")
            if "eager_peak_gib" in r["modes"]:
                mem_l, mem_f = r["modes"]["eager_peak_gib"]["lora"], r["modes"]["eager_peak_gib"]["flat"]
            else:
                mem_l = r["modes"].get("eager", m)["lora"]["peak_gib"]
                mem_f = r["modes"].get("eager", m)["flat"]["peak_gib"]
            mfu = flops / (lo["median_ms"] / 1e3) / (PEAK_BF16_TFLOPS * 1e12) if flops else None

            def f(x, fmt="{:.1f}"):
                return fmt.format(x) if x is not None else "n/a"

            alt = m.get("ratio_paired_median_flat_alt")
            alt = f" ({m.get('flat_alt_setting')}: {alt:.3f})" if alt is not None else ""

            lines.append(
                f"| {r['arch']} | {r['targets']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | {mode} | "
                f"{lo['median_ms']:.1f} | {fl['median_ms']:.1f} | {m['ratio_paired_median']:.3f}{alt} | {f(lk)} | {f(fk)} | "
                f"{f(fk / lk if lk and fk else None, '{:.3f}')} | {f(lo['median_ms'] / lk if lk else None, '{:.2f}')} | "
                f"{mem_l:.2f} | {mem_f:.2f} | {f(mem_f / mem_l if mem_l else None, '{:.4f}')} | {f(mfu * 100 if mfu else None, '{:.1f}%')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", default="sdxl,sd15")
    ap.add_argument("--targets", default="unet,unet+te")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--ckpt", default="off,on")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--eager-batches", default=None, help="time eager mode only at these batch sizes (default all)")
    ap.add_argument("--n", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--no-timing", action="store_true", help="checks and kernel micro-benchmarks only")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    ap.add_argument("--device", default="cuda")
    # the step's numerics switches default to `train`'s (config.TrainConfig), so the bench step is the trainer's
    ap.add_argument("--bf16-norms", action=argparse.BooleanOptionalAction, default=TrainConfig.bf16_norms,
                    help="the UNet's norms return bf16 under bf16 autocast (train's --bf16_norms)")
    ap.add_argument("--fused-lora", action=argparse.BooleanOptionalAction, default=TrainConfig.fused_lora,
                    help="the LoRA layers add their up projection in one GEMM (train's --fused_lora)")
    ap.add_argument("--merge", nargs="*", help="JSON files of earlier runs to merge into one table")
    ap.add_argument("--compare", default=None, metavar="ATTR=VALUE",
                    help="graph mode also times Flat-LoRA captured with this fast-engine setting (flat_alt), "
                         "e.g. evict_first=False")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = [r for p in args.merge for r in json.loads(Path(p).read_text())["results"]]
        (out / "results.md").write_text(table(results) + "\n")
        print(table(results))
        return 0

    from accelerate import Accelerator

    device = torch.device(args.device)
    acc = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        import diffusers
        import peft
        import transformers
        import triton

        env.update(gpu=torch.cuda.get_device_name(), diffusers=diffusers.__version__, peft=peft.__version__,
                   transformers=transformers.__version__, triton=triton.__version__)
    print(json.dumps(env), flush=True)
    record = {"env": env, "args": vars(args), "results": [], "checks": CHECKS, "microbench": {}}
    t_start = time.perf_counter()

    def save():
        record["elapsed_s"] = time.perf_counter() - t_start
        (out / "results.json").write_text(json.dumps(record, indent=1, default=str))
        (out / "results.md").write_text(table(record["results"]) + "\n")

    if not args.skip_checks:
        try:
            check_gradients(device, args.tiny)
        except Exception as exc:
            traceback.print_exc()
            check("gradients check ran", False, error=repr(exc))
        save()
    for arch in args.archs.split(","):
        unet, tes, sched = build(arch, device, args.tiny)
        snap = frozen_snapshot([unet] + tes)
        if not args.skip_checks:
            try:
                check_engine_against_reference(f"{arch} UNet", [unet], device)
                check_engine_against_reference(f"{arch} text encoders", tes, device, sample_layers=3)
                stored_in_fp8 = fp8_twin(unet)  # --low_memory's weights: the kernels widen them as they load them
                check_engine_against_reference(f"{arch} UNet, weights in float8", [stored_in_fp8], device)
                del stored_in_fp8
                if device.type == "cuda":
                    check_graph_equals_eager(arch, unet, tes, sched, acc, device, args.tiny)
                    record["microbench"][arch] = kernel_microbench(arch, unet, device)
            except Exception as exc:
                traceback.print_exc()
                check(f"{arch}: checks ran", False, error=repr(exc))
            save()
        for targets in ([] if args.no_timing else args.targets.split(",")):
            for ckpt in [c == "on" for c in args.ckpt.split(",")]:
                for bs in [int(b) for b in args.batches.split(",")]:
                    t0 = time.perf_counter()
                    try:
                        modes = args.modes.split(",")
                        if args.eager_batches is not None and str(bs) not in args.eager_batches.split(","):
                            modes = [m for m in modes if m != "eager"]
                        r = run_config(arch, unet, tes, sched, acc, device, args.tiny, targets, bs, ckpt,
                                       modes, args.n, args.warm, args.compare, bf16_norms=args.bf16_norms,
                                       fused_lora=args.fused_lora)
                    except Exception as exc:
                        traceback.print_exc()
                        r = {"arch": arch, "targets": targets, "batch": bs, "checkpointing": ckpt,
                             "modes": {"eager": {"error": repr(exc)[:2000]}}}
                    r["seconds"] = time.perf_counter() - t0
                    record["results"].append(r)
                    print(table([r]).splitlines()[-1], f"({r['seconds']:.0f} s)", flush=True)
                    save()
        check_frozen(arch, [unet] + tes, snap)
        del unet, tes, snap
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    print("\n" + table(record["results"]))
    failed = [c for c in CHECKS if not c["ok"]]
    print(f"\n{len(CHECKS) - len(failed)} checks passed, {len(failed)} failed", flush=True)
    for c in failed:
        print("FAIL", c["check"], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
