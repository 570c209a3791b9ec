"""One timed training process: the command lines, the process's wall time and peak memory, steady ms/step.

The flags both trainers get (shared_args: every one a flag of diffusers' script too) and our trainer's command
line (train_args); timed_run() runs one process with its output in a log, timing it from start to exit and
sampling nvidia-smi's peak; steady_ms() is the mean step time after the first third of the steps; run_trainer()
makes the row of one timed run of `flatlora-diffusion train`, from this tree or another (--code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from e2e_models import RESOLUTION, GpuClocks, PeakMemory, gpu_figures

REPO = Path(__file__).resolve().parents[1]

PROMPT = "a photo of sks toy"
N_PICTURES = 8  # whole batches at batch 1, 2, 4 and 8 (a short last batch would be a step of another size)
TRAIN_MODULE = ["-m", "flatlora_diffusion.cli", "train"]  # after `python` or `accelerate launch`


def precision() -> str:
    """bf16 on a GPU; fp32 ("no") on the CPU of the --tiny smoke test."""
    return "bf16" if torch.cuda.is_available() else "no"


def shared_args(model: Path, images: Path, out: Path, arch: str, batch: int, steps: int) -> list[str]:
    """The flags both trainers get: every one is a flag of diffusers' script for `arch`."""
    resolution = 64 if "tiny" in model.name else RESOLUTION[arch]
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(resolution),
            "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "16", "--mixed_precision", precision(),
            "--seed", "0"]
    if arch == "sd15":  # ours encodes the one prompt once by default; diffusers' SD script only with this flag
        args.append("--pre_compute_text_embeddings")  # (its SDXL script always does)
    return args


def train_args(model: Path, images: Path, out: Path, arch: str, batch: int, sigma: float, steps: int,
               flags: list[str], job: list[str] | None = None) -> list[str]:
    """Our command line: the shared flags, then ours only (--overwrite, --flat_sigma, --report_to none)."""
    shared = shared_args(model, images, out, arch, batch, steps)
    if "--low_memory" in flags:  # the mode computes in bf16 and refuses the CPU smoke test's fp32 ("no")
        shared[shared.index("--mixed_precision") + 1] = "bf16"
    return [*shared, *(job or ["--checkpointing_steps", "100000"]),
            "--overwrite", "--flat_sigma", str(sigma), "--report_to", "none", *flags]


def steady_ms_of(seconds: list[float]) -> float:
    """Mean step time over the steps after the first third, from one timestamp per step."""
    late = seconds[len(seconds) // 3:]
    return 1000 * (late[-1] - late[0]) / (len(late) - 1)


def steady_ms(metrics_file: Path) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return steady_ms_of([r["seconds"] for r in rows])


def timed_run(cmd: list[str], env: dict, log: Path) -> dict:
    """One training process: its wall time from start to exit (perf_counter clock), nvidia-smi's peak memory and
    its clock samples (GpuClocks)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with PeakMemory() as mem, GpuClocks() as clocks, log.open("w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    end = time.perf_counter()
    text = log.read_text(errors="replace")
    if proc.returncode:
        print(text[-3000:], flush=True)
    return {"rc": proc.returncode, "start": start, "end": end, "wall": end - start, "peak": mem.peak, "log": text,
            "clocks": clocks.samples}


def trainer_env(code: str | None = None) -> dict:
    """The environment of a trainer process: this tree (or `code`, first) on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, str(REPO), os.environ.get("PYTHONPATH")])))


def run_trainer(args, model, images, batch, sigma, code: str | None, label: str) -> dict:
    out = Path(args.out) / "runs" / f"{label}-b{batch}-s{sigma}"
    env = trainer_env(code)
    cmd = [sys.executable, *TRAIN_MODULE,
           *train_args(model, images, out, args.arch, batch, sigma, args.steps, args.flags.split())]
    run = timed_run(cmd, env, out.with_name(out.name + ".log"))
    if run["rc"]:
        return {"label": label, "batch": batch, "sigma": sigma, "error": run["log"][-1500:]}
    ms = steady_ms(out / "metrics.jsonl")
    row = {"label": label, "batch": batch, "sigma": sigma, "ms_per_step": round(ms, 1),
           "images_per_s": round(1000 * batch / ms, 2), "job_wall_s": round(run["wall"], 1), "peak_mib": run["peak"],
           "cuda_graph": "CUDA graph on" in run["log"], **gpu_figures(run["clocks"])}
    print(json.dumps(row), flush=True)
    return row
