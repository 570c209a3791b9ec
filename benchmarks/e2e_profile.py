"""Where a step's time goes: one in-process training run under torch.profiler (trainer_end_to_end.py --profile B).

Five steady steps: GPU time per kernel class (KERNEL_CLASSES, first match wins), the GPU's busy share of the wall
time, and per step the host-side scalar reads and stream synchronisations. The profiler slows SDXL steps ~3x:
its per-kernel times are inflated; trainer_end_to_end.py's timed runs are the figures to quote.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from e2e_runs import train_args

KERNEL_CLASSES = [  # first match wins; names of Hopper cuBLAS/cuDNN/flash kernels and this project's own
    ("flat_lora", r"_flat|flat_|_noise|_row_norm|philox"),
    ("optimizer", r"multi_tensor_apply|adam|foreach|fused_adam"),
    ("attention", r"flash|fmha|attention|attn|sdpa|cutlass.*kernel.*mem"),  # before conv: cuDNN's SDPA is "cudnn_*"
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|matmul|sm90"),
    ("norm", r"norm"),
    ("copy", r"copy|memcpy|memset|(?<!no)cast"),  # not gpu_kernel_impl_nocast<...>: elementwise kernels
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return cls
    return "elementwise/other"


def profile_run(args, model, images, batch: int, sigma: float) -> dict:
    """One in-process training run with torch.profiler over steps [first, first + 5)."""
    from accelerate.state import AcceleratorState
    from torch.profiler import ProfilerActivity, profile, schedule

    from flatlora_diffusion import run_dir as run_dir_module
    from flatlora_diffusion.config import config_from_args
    from flatlora_diffusion.train import train

    out = Path(args.out) / "runs" / f"profile-b{batch}-s{sigma}"
    first, active = max(5, args.steps // 2), 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities,
                   schedule=schedule(wait=first - 2, warmup=1, active=active, repeat=1))
    original = run_dir_module.RunDir.append_metrics
    marks = []

    def append_and_step(self, record):  # append_metrics runs once per optimizer step: the profiler's clock
        original(self, record)
        marks.append(time.perf_counter())
        prof.step()

    run_dir_module.RunDir.append_metrics = append_and_step
    cfg = config_from_args(train_args(model, images, out, args.arch, batch, sigma, first + active + 2,
                                      args.flags.split()))
    try:
        with prof:
            train(cfg)
    finally:
        run_dir_module.RunDir.append_metrics = original
        AcceleratorState._reset_state(reset_partial_state=True)
    wall_ms = 1000 * (marks[first + active - 1] - marks[first - 1])
    classes: dict[str, float] = {}
    syncs = 0
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.self_device_time_total > 0:
            cls = kernel_class(evt.key)
            classes[cls] = classes.get(cls, 0.0) + evt.self_device_time_total / 1000
        if re.search(r"cudaStreamSynchronize|cudaDeviceSynchronize|aten::_local_scalar_dense|cudaEventSynchronize",
                     evt.key):
            syncs += evt.count
    gpu_ms = sum(classes.values())
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    (Path(args.out) / f"profile_b{batch}_s{sigma}.txt").write_text(table + "\n\n" + cpu_table)
    result = {"batch": batch, "sigma": sigma, "steps": active, "wall_ms_per_step": round(wall_ms / active, 1),
              "gpu_kernel_ms_per_step": round(gpu_ms / active, 1), "gpu_busy_share": round(gpu_ms / wall_ms, 3),
              "host_syncs_per_step": round(syncs / active, 1),
              "kernel_ms_per_step": {k: round(v / active, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])}}
    print(json.dumps(result), flush=True)
    return result
