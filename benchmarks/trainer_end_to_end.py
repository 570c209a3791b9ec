"""What `flatlora-diffusion train` achieves end to end on a GPU, next to the benchmark's bare step and diffusers.

    python benchmarks/trainer_end_to_end.py --out DIR [--arch sdxl] [--batches 1,4] [--sigmas 0,0.1]
        [--steps 30] [--flags "--cache_latents"] [--code OLD_TREE] [--profile BATCH] [--bare-step]
        [--diffusers-script PATH] [--job [--job-steps 200] [--job-batch 1] [--job-validation-steps 100]
        [--job-checkpointing-steps 100] [--job-sigma 0.1]] [--tiny]

Builds a random-weight full-size pipeline offline (SDXL at 1024 px or SD 1.5 at 512 px, the real configs,
fp16 on disk, the project's own tokenizers) in /tmp/full-ARCH, renders 8 instance pictures, and runs the real
command line (`python -m flatlora_diffusion.cli train`, bf16, rank 16 attention LoRA, no validation, no checkpoint)
once per (batch, sigma): steady-state ms/step from metrics.jsonl (the steps after the first third), images/s, the
job's wall time, and the peak GPU memory nvidia-smi sees (sampled every 50 ms). `--code DIR` runs the trainer
from another source tree (e.g. `git worktree add /tmp/old <commit>`), so a before/after pair is timed on the
same machine in one call. `--profile B` adds one in-process run at batch B with torch.profiler over five
steady steps: time per kernel class, the GPU's busy share of the wall time, and per step the host-side scalar reads
(`.item()`, also of CPU tensors) plus stream synchronisations ("host_syncs_per_step"). The profiler slows SDXL
steps ~3x, so its per-kernel times are inflated; the timed runs above are the figures to quote.
`--bare-step` adds the benchmark's own graphed step (bench_flat.py's step on a pre-made batch) for reference.

`--diffusers-script PATH` also runs diffusers' train_dreambooth_lora_sdxl.py (--arch sdxl) or
train_dreambooth_lora.py (sd15), never committed here, once per batch size (label "diffusers"; Flat-LoRA has no
counterpart there) with the same model, pictures and flags; flags its script lacks (--cache_latents) are left
out and listed in results.json. Its steady ms/step (same rule) comes from outside the script: a sitecustomize.py
written into DIR/hooks and put first on PYTHONPATH registers torch's global optimizer step post-hook, which notes
time.perf_counter() after torch.cuda.synchronize(). `--job` times a standard job, process start to exit, for both
trainers: --job-steps at --job-batch, 4 validation images of one prompt every --job-validation-steps (diffusers:
the --validation_epochs that gives as many validations with a trained LoRA, its final inference included), a
checkpoint every --job-checkpointing-steps, the LoRA files at the end; each row records the validation rounds,
images, denoising steps, checkpoints and LoRA files the trainer really made, and for ours the validation rounds'
time (the same hook times Trainer._make_validation_images) and their share of the job's wall time.
results.json["diffusers"]["differences"] says what else differs between the two.

`--tiny` is a smoke test of all this on any device: the tiny offline models at 64 px (fp32 on a CPU). diffusers'
scripts import torchvision at module level; a CPU-only torch needs a torchvision that imports beside it.
Writes DIR/results.json, DIR/runs/ (each run's folder and log) and DIR/profile_*.txt; prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# One concern a module: e2e_models.py (the full-size model, peak memory), e2e_runs.py (a timed process, our
# command line), e2e_hooks.py (timestamps from inside a trainer through a sitecustomize.py), e2e_diffusers.py
# (diffusers' scripts), e2e_job.py (the standard job), e2e_profile.py (torch.profiler's breakdown).
from e2e_diffusers import run_diffusers, script_facts  # noqa: E402
from e2e_job import job_settings, run_job  # noqa: E402
from e2e_models import RESOLUTION, build_full_size  # noqa: E402
from e2e_profile import profile_run  # noqa: E402
from e2e_runs import N_PICTURES, precision, run_trainer  # noqa: E402


# train's flags that change the training step -> bench_flat.py's spelling of them
BENCH_STEP_FLAGS = {"--bf16_norms": "--bf16-norms", "--no_bf16_norms": "--no-bf16-norms",
                    "--fused_lora": "--fused-lora", "--no_fused_lora": "--no-fused-lora"}


def bare_step(args) -> list[dict]:
    """The benchmark's graphed step on a pre-made batch (bench_flat.py), same card, for reference."""
    out = Path(args.out) / "bare"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_flat.py"), "--out", str(out), "--archs", args.arch,
           "--targets", "unet", "--batches", args.batches, "--ckpt", "off", "--modes", "graph", "--skip-checks"]
    # the step's numerics as in the trainer's runs: the flags they set; bench_flat defaults to train's defaults
    cmd += [BENCH_STEP_FLAGS[flag] for flag in args.flags.split() if flag in BENCH_STEP_FLAGS]
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
    ap.add_argument("--diffusers-script", default=None, metavar="PATH",
                    help="Also run diffusers' train_dreambooth_lora(_sdxl).py with the same flags (label 'diffusers').")
    ap.add_argument("--job", action="store_true", help="Also time the standard job, whole process, both trainers.")
    ap.add_argument("--job-steps", type=int, default=200)
    ap.add_argument("--job-batch", type=int, default=1)
    ap.add_argument("--job-validation-steps", type=int, default=100)
    ap.add_argument("--job-checkpointing-steps", type=int, default=100)
    ap.add_argument("--job-sigma", type=float, default=0.1, help="Our trainer's --flat_sigma in the job (its default).")
    ap.add_argument("--job-trainers", default="now,diffusers",
                    help="Which trainers run the job (diffusers' only with --diffusers-script): a 500-step job of "
                         "both takes longer than one device call, so each can have its own.")
    ap.add_argument("--tiny", action="store_true", help="Smoke test of this script: the tiny model, 64 px, any device.")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.diffusers_script:
        script = Path(args.diffusers_script)
        if not script.is_file():
            ap.error(f"--diffusers-script {script}: no such file")
        if ("sdxl" in script.name) != (args.arch == "sdxl"):
            ap.error(f"--diffusers-script {script.name} does not match --arch {args.arch}")
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
    make_subject_images(images, n=N_PICTURES, size=64 if args.tiny else RESOLUTION[args.arch])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"device": device, "arch": args.arch, "steps": args.steps, "flags": args.flags,
               "precision": precision(), "argv": sys.argv[1:], "runs": []}
    if args.diffusers_script:
        results["diffusers"] = script_facts(args)

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    trees = ([("before", args.code)] if args.code else []) + [("after" if args.code else "now", None)]
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:  # --batches "": the job alone
        for sigma in map(float, args.sigmas.split(",")):
            for label, code in trees:
                results["runs"].append(run_trainer(args, model, images, batch, sigma, code, label))
                save()
        if args.diffusers_script:  # Flat-LoRA has no diffusers counterpart: once per batch size
            results["runs"].append(run_diffusers(args, model, images, batch))
            save()
    if args.job:
        results["job"] = job_settings(args)
        wanted = args.job_trainers.split(",")
        for trainer in [t for t in ("now", "diffusers") if t in wanted and (t == "now" or args.diffusers_script)]:
            results["job"]["runs"].append(run_job(args, model, images, trainer))
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
