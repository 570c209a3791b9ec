"""Where `flatlora-diffusion train` holds GPU memory: the allocator's figures after each phase of a real run.

    python benchmarks/trainer_memory.py --out DIR [--arch sdxl] [--batch 1] [--sigma 0.1] [--steps 6]
        [--flags "--cache_latents"] [--code TREE]

One in-process training run (the same settings as trainer_end_to_end.py: random-weight full-size model built
offline in a subprocess, bf16, rank 16) with each trainer phase wrapped: after loading the models, the data
and latent cache, parking the idle models, the optimizer, Flat-LoRA, accelerate's prepare, each CUDA-graph
warm-up pass, the capture, and the first steps, it records torch's allocated and reserved memory, the phase's
peak allocated (reset between phases) and nvidia-smi's figure for the GPU, plus nvidia-smi's peak
over the whole run (sampled every 50 ms). `--code TREE` runs the trainer of
another source tree (before/after in one GPU call). Writes DIR/memory_<label>.json and prints one line a phase.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def smi_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() else -1


class PhaseLog:
    def __init__(self):
        self.rows: list[dict] = []

    def mark(self, phase: str) -> None:
        if not torch.cuda.is_available():  # the --tiny smoke test on a CPU: the phases only
            self.rows.append({"phase": phase, "nvidia_smi_mib": -1})
            return
        torch.cuda.synchronize()
        gib = 2.0 ** 30
        row = {"phase": phase, "allocated_gib": round(torch.cuda.memory_allocated() / gib, 2),
               "reserved_gib": round(torch.cuda.memory_reserved() / gib, 2),
               "phase_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
               "nvidia_smi_mib": smi_mib(), "t": round(time.perf_counter(), 2)}
        torch.cuda.reset_peak_memory_stats()
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def wrap(self, owner, name: str, phase: str | None = None) -> None:
        """Mark after every call of owner.name (if it exists in this tree)."""
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def marked(*a, **k):
            result = original(*a, **k)
            if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                self.mark(phase or name)  # (no synchronize inside a graph capture)
            return result

        setattr(owner, name, marked)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="sdxl", choices=["sdxl", "sd15"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--flags", default="--cache_latents")
    ap.add_argument("--code", default=None, help="Source tree of the trainer to measure (default: this one).")
    ap.add_argument("--label", default="now")
    ap.add_argument("--tiny", action="store_true", help="Smoke test of this script on the tiny model (any device).")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from e2e_models import RESOLUTION, PeakMemory
    from e2e_runs import train_args

    sys.path.insert(0, args.code or str(REPO))
    from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline

    from flatlora_diffusion import train as train_module

    if hasattr(train_module, "_use_expandable_segments"):  # as the CLI does, before anything touches the GPU
        train_module._use_expandable_segments()
    out = Path(args.out)
    if args.tiny:
        model = make_tiny_pipeline(out / f"tiny-{args.arch}", args.arch)
    else:
        model = Path("/tmp") / f"full-{args.arch}"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "trainer_end_to_end.py"), "--out", str(out),
                        "--arch", args.arch, "--build-only"], check=True)
    images = out / "images"
    make_subject_images(images, n=8, size=64 if args.tiny else RESOLUTION[args.arch])

    import flatlora_diffusion.graphed_step as graphed
    from flatlora_diffusion import run_dir as run_dir_module
    from flatlora_diffusion.config import config_from_args
    from flatlora_diffusion.train import train
    from flatlora_diffusion.trainer.trainer import Trainer

    log = PhaseLog()
    for name in ("_load_models", "_prepare_data", "_park_idle_models", "_unet_to_device", "_build_optimizer",
                 "_build_flat", "_prepare_accelerate"):
        log.wrap(Trainer, name)
    log.wrap(graphed.GraphedTrainStep, "_body", "graph warm-up pass")
    log.wrap(graphed.GraphedTrainStep, "_capture", "graph captured")
    steps = []
    original_append = run_dir_module.RunDir.append_metrics

    def append_and_mark(self, record):  # once per optimizer step
        original_append(self, record)
        steps.append(1)
        if len(steps) <= 3 or len(steps) == args.steps:
            log.mark(f"step {len(steps)}")

    run_dir_module.RunDir.append_metrics = append_and_mark
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log.mark("start (CUDA context)")
    cfg = config_from_args(train_args(model, images, out / "runs" / args.label, args.arch, args.batch, args.sigma,
                                      args.steps, args.flags.split()))
    with PeakMemory() as peak:  # between the marks too, sampled every 50 ms
        train(cfg)
    result = {"label": args.label, "code": args.code or str(REPO), "arch": args.arch, "batch": args.batch,
              "sigma": args.sigma, "flags": args.flags, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "phases": log.rows,
              "max_nvidia_smi_mib_at_marks": max(r["nvidia_smi_mib"] for r in log.rows),
              "peak_nvidia_smi_mib": peak.peak}
    print(json.dumps({k: result[k] for k in ("label", "batch", "peak_nvidia_smi_mib")}), flush=True)
    (out / f"memory_{args.label}_b{args.batch}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
