"""`flatlora-diffusion demo`: the whole product on a tiny offline model, in about a minute on two CPU cores.

It builds a tiny random-weight pipeline and a small synthetic subject, trains plain LoRA and Flat-LoRA with
identical seeds (the same data order, diffusion noise and timesteps: only the weight perturbation differs),
and writes both run directories and comparison.png: their validation images side by side, per prompt and
seed, with the untrained baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SUBJECT_PROMPT = "a photo of sks toy"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatlora-diffusion demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="flatlora-demo", help="Folder for the model, data, both runs and comparison.png.")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--steps", type=int, default=100, help="Training steps of each run.")
    p.add_argument("--sigma", type=float, default=0.1, help="Flat-LoRA sigma of the second run.")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def run_config(model: Path, images: Path, out: Path, sigma: float, args) -> dict:
    """The settings of one demo run (the same for both but sigma)."""
    return {
        "pretrained_model_name_or_path": str(model),
        "instance_data_dir": str(images),
        "instance_prompt": SUBJECT_PROMPT,
        "output_dir": str(out),
        "resolution": args.resolution,
        "train_batch_size": 1,
        "max_train_steps": args.steps,
        "learning_rate": 5e-3,
        "lr_warmup_steps": 0,
        "rank": 4,
        "seed": args.seed,
        "flat_sigma": sigma,
        "train_text_encoder": True,
        "random_flip": True,
        "validation_prompt": [SUBJECT_PROMPT, "a sks toy on the beach"],
        "validation_seeds": [0, 1],
        "validation_steps": max(1, args.steps // 2),
        "validation_inference_steps": 8,
        "checkpointing_steps": 10**9,
    }


def _final_samples(run: Path) -> tuple[int, dict[str, str]]:
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "samples").glob("step_*") if (p / ".complete").exists())
    prompts = json.loads((run / "samples" / "prompts.json").read_text())
    return steps[-1], prompts


def comparison_image(runs: list[tuple[str, Path]], out_file: Path) -> Path:
    """Validation images of the runs side by side: a baseline column (step 0), then each run's final step."""
    from PIL import Image

    from .sample import comparison_grid

    first = runs[0][1]
    final_step, prompts = _final_samples(first)
    seeds = sorted({p.stem.split("_", 1)[1] for p in (first / "samples" / "step_000000").glob("*.png")}, key=int)
    rows = [(p, s) for p in sorted(prompts, key=int) for s in seeds]

    def column(run: Path, step: int):
        images = [Image.open(run / "samples" / f"step_{step:06d}" / f"{p}_{s}.png").convert("RGB") for p, s in rows]
        # Tiny demo images are 64 px: show them at least 160 px wide so the labels fit.
        factor = max(1, -(-160 // images[0].width))
        return [im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in images]

    columns = [("base model (step 0)", column(first, 0))]
    columns += [(f"{label} (step {final_step})", column(path, final_step)) for label, path in runs]
    grid = comparison_grid(columns, row_labels=[f"{prompts[p]} | seed {s}" for p, s in rows])
    tmp = out_file.with_name(out_file.name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(out_file)
    return out_file


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.sigma < 0 or args.resolution % 8:
        print("error: --steps must be >= 1, --sigma >= 0 and --resolution a multiple of 8", file=sys.stderr)
        return 2
    import os

    import torch
    from accelerate.state import AcceleratorState

    if "OMP_NUM_THREADS" not in os.environ:
        # Tiny 64 px models gain nothing from more threads, and torch's spinning OpenMP threads made the demo
        # 5-60x slower whenever another process was busy on a 2-core machine (measured: 93 s vs 20 s).
        torch.set_num_threads(1)

    from .cli import _setup_logging
    from .config import make_config
    from .tiny import make_tiny_pipeline, make_subject_images
    from .train import train

    _setup_logging()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = out / f"tiny-{args.arch}"
    if not (model / "model_index.json").exists():
        make_tiny_pipeline(model, arch=args.arch, seed=args.seed)
    images = out / "subject"
    if not images.exists():
        make_subject_images(images, n=4, size=args.resolution * 2, seed=args.seed)
    runs = [("LoRA", out / "lora", 0.0), (f"Flat-LoRA sigma={args.sigma:g}", out / "flat-lora", args.sigma)]
    for label, path, sigma in runs:
        print(f"== training {label} -> {path}", file=sys.stderr)
        train(make_config(run_config(model, images, path, sigma, args)))
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own Accelerator
    grid = comparison_image([(label, path) for label, path, _ in runs], out / "comparison.png")
    summary = {label: _last_loss(path) for label, path, _ in runs}
    print(f"done in {time.time() - started:.0f} s")
    for label, loss in summary.items():
        print(f"  {label}: final loss {loss:.4f}")
    print(f"runs: {', '.join(str(p) for _, p, _ in runs)}\ncomparison: {grid}")
    return 0


def _last_loss(run: Path, window: int = 10) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()[-window:]
    values = [json.loads(line)["loss"] for line in lines]
    return sum(values) / len(values)
