"""One training run on N processes, launched as users launch it, and what its log says about the step it ran.

N > 1: `accelerate launch --multi_gpu --num_processes N -m flatlora_diffusion.cli train ...` (NCCL on GPUs). On a
CPU (the --tiny smoke test) the same line with ACCELERATE_USE_CPU=true, which makes accelerate's torchrun
processes a gloo group (accelerate refuses --cpu together with --multi_gpu, and --cpu alone starts one process).
N = 1: `python -m flatlora_diffusion.cli train ...`, a one-GPU user's command (CUDA graph by default).
Each run gets a free rendezvous port: runs follow each other quickly, and a port still held by the last one
would fail the next.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import torch

from e2e_runs import TRAIN_MODULE, precision, timed_run, trainer_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(processes: int) -> list[str]:
    """The command up to the trainer's own flags."""
    if processes == 1:
        return [sys.executable, *TRAIN_MODULE]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", precision(), "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *TRAIN_MODULE]


def launch_env() -> dict:
    env = trainer_env()
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def log_facts(log: str) -> dict:
    """What the trainer's log says about its steps: CUDA graph (trainer/setup.py: "CUDA graph on" or "CUDA graph
    off: why"), the Flat-LoRA path ("Flat-LoRA path: fused ..." or "reference (why)") and, with several processes,
    each process's fingerprint of its Flat-LoRA noise at step 1."""
    def line(marker: str) -> str | None:
        found = re.search(re.escape(marker) + r"[^\n]*", log)
        return found.group(0).strip() if found else None

    graph = line("CUDA graph o")
    path = line("Flat-LoRA path:")
    prints = re.search(r"Flat-LoRA noise per process \([^)]*\): ([0-9a-f ]+)", log)
    return {"cuda_graph": bool(graph and graph.startswith("CUDA graph on")), "cuda_graph_log": graph,
            "flat_fused": bool(path and "fused" in path), "flat_path_log": path,
            "noise_fingerprints": prints.group(1).split() if prints else None}


def launch(processes: int, train_argv: list[str], out: Path) -> dict:
    """Run the trainer into `out` (log: out + ".log"); the timed run (e2e_runs.timed_run) and its log facts."""
    cmd = [*launch_prefix(processes), *train_argv]
    run = timed_run(cmd, launch_env(), out.with_name(out.name + ".log"))
    return {**run, **log_facts(run["log"]), "command": " ".join(cmd)}
