"""Multi-GPU training through `accelerate launch` on NCCL: scaling, correctness, resume (issue 19).

    python benchmarks/multi_gpu.py --out DIR [--archs sdxl,sd15] [--gpus 1,2,4,8] [--parts scaling,correctness,resume]
        [--sigmas 0,0.1] [--steps 24] [--batch 1] [--check-n N] [--check-steps 6] [--check-every 3]
        [--check-sigma 0.1] [--resume-to N,1] [--tolerance 0.01] [--no-eager-baseline] [--flags "--cache_latents"]
        [--tiny]

Per architecture (SDXL at 1024 px, SD 1.5 at 512 px: random-weight full-size models built offline by
trainer_end_to_end.py --build-only into /tmp/full-ARCH; bf16, rank 16 attention LoRA, 8 pictures) it runs the
real command line, `accelerate launch --multi_gpu --num_processes N -m flatlora_diffusion.cli train ...` (plain
`python -m ...` for N = 1), for the parts of mgpu_parts.py: scaling (images/s at each N of --gpus, efficiency
against one GPU), correctness (1 process with N-fold accumulation vs N processes, shared noise; per-process noise
without it) and resume (an N-process checkpoint resumed on N and on another count). Every run's folder is checked
for files written once (mgpu_outputs.py). --gpus defaults to 1, 2, 4, 8 up to torch.cuda.device_count().

Writes DIR/results.json and DIR/summary.md after every run; a results.json already in DIR keeps the parts and
architectures this call does not run, so calls of one architecture or part each fit a time limit and the table
still ends up in one file.
DIR/runs/ holds each run's folder and log.

`--tiny`: the same orchestration on the CPU (tiny offline models, 64 px, fp32, accelerate's processes on gloo),
N = 1, 2: a smoke test of this script (tests/test_multi_gpu_script.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from e2e_models import RESOLUTION  # noqa: E402
from e2e_runs import N_PICTURES, precision  # noqa: E402
from mgpu_parts import correctness, device_name, resume, scaling  # noqa: E402
from mgpu_report import summary  # noqa: E402

PARTS = ("scaling", "correctness", "resume")


def _ints(ap: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} takes comma-separated whole numbers, got {text!r}")
    if not values or min(values) < 1:
        ap.error(f"{flag} needs numbers >= 1, got {text!r}")
    return values


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", default="sdxl,sd15")
    ap.add_argument("--gpus", default=None, help="Process counts (default: 1,2,4,8 up to the GPUs there are).")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--sigmas", default="0,0.1", help="Flat-LoRA sigmas of the scaling runs.")
    ap.add_argument("--steps", type=int, default=24, help="Steps of a scaling run (steady: after the first third).")
    ap.add_argument("--batch", type=int, default=1, help="Batch per process (--train_batch_size).")
    ap.add_argument("--check-n", type=int, default=None, help="Processes of the correctness and resume runs "
                    "(default: the largest of --gpus).")
    ap.add_argument("--check-steps", type=int, default=6)
    ap.add_argument("--check-every", type=int, default=3, help="Checkpoint and validation interval of those runs.")
    ap.add_argument("--check-sigma", type=float, default=0.1)
    ap.add_argument("--resume-to", default=None, help="Process counts to resume on (default: N,1).")
    ap.add_argument("--tolerance", type=float, default=1e-2,
                    help="Largest ||LoRA_N - LoRA_1|| / ||LoRA_1|| of one tensor that counts as equal.")
    ap.add_argument("--no-eager-baseline", dest="eager_baseline", action="store_false",
                    help="Skip the one-GPU runs with --cuda_graph off.")
    ap.add_argument("--flags", default="--cache_latents", help="Further train flags, one string.")
    ap.add_argument("--tiny", action="store_true", help="Smoke test of this script on the CPU: tiny models, gloo.")
    args = ap.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not args.archs or set(args.archs) - set(RESOLUTION):
        ap.error(f"--archs takes {' and/or '.join(sorted(RESOLUTION))}, got {','.join(args.archs)!r}")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        ap.error(f"--parts takes some of {','.join(PARTS)}, got {','.join(args.parts)!r}")
    try:
        args.sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sigmas takes comma-separated numbers, got {args.sigmas!r}")
    if min(args.steps, args.batch, args.check_every) < 1 or args.steps < 4:
        ap.error("--steps must be >= 4 (a steady rate needs a few steps after the first third); --batch and "
                 "--check-every >= 1")
    if args.check_steps <= args.check_every:
        ap.error(f"--check-steps ({args.check_steps}) must exceed --check-every ({args.check_every}): the resume "
                 f"needs a checkpoint before the last step")
    available = torch.cuda.device_count()
    if not args.tiny and not available:
        ap.error("no CUDA GPU here: the benchmark needs GPUs (--tiny runs its smoke test on the CPU)")
    limit = 2 if args.tiny else available
    args.gpus = _ints(ap, args.gpus, "--gpus") if args.gpus else [n for n in (1, 2, 4, 8) if n <= limit]
    if max(args.gpus) > limit:
        ap.error(f"--gpus {max(args.gpus)}: only {limit} {'CPU processes in --tiny' if args.tiny else 'GPUs'} here")
    args.check_n = args.check_n or max(args.gpus)
    if not 2 <= args.check_n <= limit:
        ap.error(f"--check-n must be from 2 to {limit}, got {args.check_n}")
    args.resume_to = _ints(ap, args.resume_to, "--resume-to") if args.resume_to else [args.check_n, 1]
    if max(args.resume_to) > limit:
        ap.error(f"--resume-to {max(args.resume_to)}: only {limit} here")
    if (N_PICTURES // args.batch) % args.check_n:
        ap.error(f"the {N_PICTURES} pictures at --batch {args.batch} do not split into whole batches for "
                 f"{args.check_n} processes")
    args.gpus_available = available
    return args


def model_and_images(args, arch: str, out: Path) -> tuple[Path, Path]:
    from flatlora_diffusion.tiny import make_subject_images

    if args.tiny:
        from flatlora_diffusion.tiny import make_tiny_pipeline

        model = make_tiny_pipeline(out / f"tiny-{arch}", arch)
    else:  # built in a process of its own, so that no GPU memory of this one counts in a run's peak
        model = Path("/tmp") / f"full-{arch}"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "trainer_end_to_end.py"), "--out", str(out),
                        "--arch", arch, "--build-only"], check=True)
    images = out / f"images-{arch}"
    make_subject_images(images, n=N_PICTURES, size=64 if args.tiny else RESOLUTION[arch])
    return model, images


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"archs": {}}
    results.update(device=device_name(), gpus_available=args.gpus_available, tiny=args.tiny,
                   precision=precision(), argv=sys.argv[1:] if argv is None else list(argv))

    def save():
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        (out / "summary.md").write_text(summary(results))

    for arch in args.archs:
        model, images = model_and_images(args, arch, out)
        parts = results["archs"].setdefault(arch, {})  # a part of an earlier call stays unless rerun
        ctx = SimpleNamespace(**{**vars(args), "flags": args.flags.split()}, arch=arch, model=model, images=images,
                              runs=out / "runs" / arch, save=save)
        if "scaling" in args.parts:
            parts["scaling"] = {"rows": []}  # filled run by run: a call cut short keeps the rows it made
            scaling(ctx, parts["scaling"])
            save()
        if "correctness" in args.parts or "resume" in args.parts:
            parts["correctness"] = correctness(ctx)  # resume starts from its N-process run (check-B)
            save()
        if "resume" in args.parts and "error" not in parts["correctness"]["runs"]["B"]:
            parts["resume"] = resume(ctx, ctx.runs / "check-B")
            save()
    print(summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
