"""What `flatlora-diffusion train` achieves end to end on a GPU, next to the benchmark's bare step.

    python benchmarks/trainer_end_to_end.py --out DIR [--arch sdxl] [--batches 1,4] [--sigmas 0,0.1]
        [--steps 30] [--flags "--cache_latents"] [--code OLD_TREE] [--profile BATCH] [--bare-step]

Builds a random-weight full-size pipeline offline (SDXL at 1024 px or SD 1.5 at 512 px, the real configs,
fp16 on disk, the project's own tokenizers), renders instance pictures, and runs the real command line
(`python -m flatlora_diffusion.cli train`, bf16, rank 16 attention LoRA, no validation, no checkpoint) once
per (batch, sigma): steady-state ms/step from metrics.jsonl (the steps after the first third), images/s, the
job's wall time, and the peak GPU memory nvidia-smi sees (sampled every 50 ms). `--code DIR` runs the trainer
from another source tree (e.g. `git worktree add /tmp/old <commit>`), so a before/after pair is timed on the
same machine in one call. `--profile B` adds one in-process run at batch B with torch.profiler over five
steady steps: time per kernel class, the GPU's busy share of the wall time, and per step the host-side scalar reads
(`.item()`, also of CPU tensors) plus stream synchronisations ("host_syncs_per_step"). The profiler slows SDXL
steps ~3x, so its per-kernel times are inflated; the timed runs above are the figures to quote.
`--bare-step` adds the benchmark's own graphed step (bench_flat.py's step on a pre-made batch) for reference.
Writes DIR/results.json (and DIR/profile_*.txt); prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESOLUTION = {"sdxl": 1024, "sd15": 512}
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SCALING = {"sdxl": 0.13025, "sd15": 0.18215}


def build_full_size(arch: str, out: Path) -> Path:
    """A pipeline folder with the real model sizes and random weights (tokenizers and scheduler from tiny/)."""
    from bench_flat import te_configs, unet_config
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from flatlora_diffusion.tiny import make_tiny_pipeline

    if (out / "model_index.json").exists():
        return out
    t0 = time.time()
    make_tiny_pipeline(out, arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        parts = {"unet": UNet2DConditionModel(**unet_config(arch, tiny=False)),
                 "vae": AutoencoderKL(**VAE, sample_size=RESOLUTION[arch], scaling_factor=SCALING[arch],
                                      force_upcast=arch == "sdxl")}
        cfgs = te_configs(arch, tiny=False)
        parts["text_encoder"] = CLIPTextModel(cfgs[0])
        if arch == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(cfgs[1])
    for name, module in parts.items():
        for f in (out / name).iterdir():
            f.unlink()
        module.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
    print(f"built full-size {arch} in {time.time() - t0:.0f} s", flush=True)
    return out


class PeakMemory:
    """Peak `memory.used` of GPU 0 as nvidia-smi reports it (what a user sees), sampled every 50 ms."""

    def __enter__(self):
        self.peak = 0
        if not torch.cuda.is_available():  # the --tiny smoke test on a CPU
            self._proc = None
            return self
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0", "-lms", "50"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak = max(self.peak, int(line))

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        self._thread.join(timeout=5)


def train_args(model: Path, images: Path, out: Path, arch: str, batch: int, sigma: float, steps: int,
               flags: list[str]) -> list[str]:
    resolution = 64 if "tiny" in model.name else RESOLUTION[arch]
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--overwrite",
            "--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "16",
            "--mixed_precision", "bf16", "--seed", "0", "--flat_sigma", str(sigma),
            "--checkpointing_steps", "100000", "--report_to", "none", *flags]


def steady_ms(metrics_file: Path) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    late = rows[len(rows) // 3:]
    return 1000 * (late[-1]["seconds"] - late[0]["seconds"]) / (len(late) - 1)


def run_trainer(args, model, images, batch, sigma, code: str | None, label: str) -> dict:
    out = Path(args.out) / "runs" / f"{label}-b{batch}-s{sigma}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "flatlora_diffusion.cli", "train",
           *train_args(model, images, out, args.arch, batch, sigma, args.steps, args.flags.split())]
    t0 = time.time()
    with PeakMemory() as mem:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        return {"label": label, "batch": batch, "sigma": sigma, "error": proc.stderr[-1500:]}
    ms = steady_ms(out / "metrics.jsonl")
    graph = "CUDA graph on" in proc.stderr
    row = {"label": label, "batch": batch, "sigma": sigma, "ms_per_step": round(ms, 1),
           "images_per_s": round(1000 * batch / ms, 2), "job_wall_s": round(wall, 1), "peak_mib": mem.peak,
           "cuda_graph": graph}
    print(json.dumps(row), flush=True)
    return row


# --------------------------------------------------------------------------------------------------- profile

KERNEL_CLASSES = [  # first match wins; names of Hopper cuBLAS/cuDNN/flash kernels and this project's own
    ("flat_lora", r"_flat|flat_|_noise|_row_norm|philox"),
    ("optimizer", r"multi_tensor_apply|adam|foreach|fused_adam"),
    ("attention", r"flash|fmha|attention|attn|sdpa|cutlass.*kernel.*mem"),  # before conv: cuDNN's SDPA is "cudnn_*"
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|matmul|sm90"),
    ("norm", r"norm"),
    ("copy", r"copy|memcpy|memset|cast"),
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


def bare_step(args) -> list[dict]:
    """The benchmark's graphed step on a pre-made batch (bench_flat.py), same card, for reference."""
    out = Path(args.out) / "bare"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_flat.py"), "--out", str(out), "--archs", args.arch,
           "--targets", "unet", "--batches", args.batches, "--ckpt", "off", "--modes", "graph", "--skip-checks"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = []
    if (out / "results.json").exists():
        for r in json.loads((out / "results.json").read_text())["results"]:
            graph = r.get("modes", {}).get("graph", {})
            if "lora" in graph:
                rows.append({"batch": r["batch"], "lora_ms": round(graph["lora"]["median_ms"], 1),
                             "flat_ms": round(graph["flat"]["median_ms"], 1),
                             "peak_gib": round(graph["flat"]["peak_gib"], 2)})
    if not rows:
        print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
    print(json.dumps({"bare_step": rows}), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="sdxl", choices=sorted(RESOLUTION))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sigmas", default="0,0.1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--flags", default="--cache_latents", help="Further train flags, one string.")
    ap.add_argument("--code", default=None, help="Also time the trainer of this source tree (label 'before').")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH")
    ap.add_argument("--bare-step", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="Smoke test of this script: the tiny model, 64 px, any device.")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:
        build_full_size(args.arch, Path("/tmp") / f"full-{args.arch}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flatlora_diffusion.tiny import make_subject_images

    if args.tiny:
        from flatlora_diffusion.tiny import make_tiny_pipeline

        model = make_tiny_pipeline(out / f"tiny-{args.arch}", args.arch)
    else:
        # Built in a process of its own: memory this process held on the GPU would count in every run's peak.
        model = Path("/tmp") / f"full-{args.arch}"
        subprocess.run([sys.executable, __file__, "--out", args.out, "--arch", args.arch, "--build-only"], check=True)
    images = out / "images"
    # 8 pictures: whole batches at batch 1, 2, 4 and 8 (a short last batch would be a step of another size).
    make_subject_images(images, n=8, size=64 if args.tiny else RESOLUTION[args.arch])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"device": device, "arch": args.arch, "steps": args.steps, "flags": args.flags,
               "runs": []}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    trees = ([("before", args.code)] if args.code else []) + [("after" if args.code else "now", None)]
    for batch in map(int, args.batches.split(",")):
        for sigma in map(float, args.sigmas.split(",")):
            for label, code in trees:
                results["runs"].append(run_trainer(args, model, images, batch, sigma, code, label))
                save()
    if args.bare_step:
        results["bare_step"] = bare_step(args)
        save()
    if args.profile:
        results["profile"] = profile_run(args, model, images, args.profile, max(map(float, args.sigmas.split(","))))
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
