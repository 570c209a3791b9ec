"""--low_memory's quality guard (issue 20 part 4): does storing the base weights in float8 change training?

    OMP_NUM_THREADS=1 python benchmarks/low_memory_quality.py [--workdir DIR] [--seeds 3] [--steps 100]

On the toy world's DreamBooth task (toyworld/recipe.py: 5 subject renders, prior preservation, rank 4, lr 5e-3,
Flat-LoRA sigma 0.1), trained as the mode allows it (UNet LoRA only: the mode refuses a trained text encoder),
in bf16 mixed precision on the CPU: for each training seed one run with the base weights as shipped (fp16 on disk,
bf16 compute) and one with --low_memory (float8 storage, bf16 compute, gradient checkpointing). The toy world is
a real pretrained model, so its weights' float8 rounding is the kind a real checkpoint gets.

The guard: in every window of 10 steps, the float8 rounding's effect on the loss (the paired difference, low_memory
minus bf16 with the same training seed: same data order, timesteps and noise) is smaller than the bf16 runs'
seed-to-seed spread (their standard deviation over the training seeds in that window). Whether a run's curve lies
inside min..max of the bf16 curves is reported too, but it is no test: each low-memory run tracks its bf16 twin,
which is often itself the edge of three seeds' range. Also reported: each final LoRA's toy-world subject score
(the judge, the demo's prompts and seeds) so that "same loss, worse pictures" would show.

Writes benchmarks/results/low_memory_quality.json (the committed one: 3 seeds, 100 steps, 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOW = 10


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _windows(losses: list[float]) -> list[float]:
    return [round(sum(losses[i:i + WINDOW]) / len(losses[i:i + WINDOW]), 5) for i in range(0, len(losses), WINDOW)]


def train_arm(workdir: Path, instance: Path, classes: Path, seed: int, steps: int, low_memory: bool) -> Path:
    from accelerate.state import AcceleratorState

    from flatlora_diffusion.config import make_config
    from flatlora_diffusion.toyworld.recipe import dreambooth_settings
    from flatlora_diffusion.train import train

    out = workdir / f"{'low_memory' if low_memory else 'bf16'}-seed{seed}"
    if (out / "pytorch_lora_weights.safetensors").exists():
        return out  # reused: an interrupted guard continues
    settings = dreambooth_settings(out, instance, classes, flat_sigma=0.1, seed=seed, steps=steps)
    settings.update(train_text_encoder=False, mixed_precision="bf16", low_memory=low_memory, overwrite=True)
    train(make_config(settings))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def subject_score(run: Path) -> dict:
    """The demo's reading of a LoRA: the judge on the subject prompts in every scene (fixed seeds)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from flatlora_diffusion.sample import lora_loaded
    from flatlora_diffusion.toyworld import model_dir
    from flatlora_diffusion.toyworld.judge import load_judge
    from flatlora_diffusion.toyworld.measure import MEASURE_SEED, subject_scores
    from flatlora_diffusion.toyworld.world import SCENES

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir()), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    with lora_loaded(pipe, run / "pytorch_lora_weights.safetensors"):
        scores = subject_scores(pipe, load_judge(), list(SCENES), [MEASURE_SEED + i for i in range(4)])
    return {"subject": scores["subject"], "scene": scores["scene"], "samples": scores["samples"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/low_memory_quality")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "low_memory_quality.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flatlora_diffusion.toyworld.recipe import write_task_data

    workdir = Path(args.workdir)
    instance, classes = write_task_data(workdir / "data")
    arms: dict[str, list[dict]] = {"bf16": [], "low_memory": []}
    for seed in range(args.seeds):
        for arm in arms:
            run = train_arm(workdir, instance, classes, seed, args.steps, arm == "low_memory")
            arms[arm].append({"seed": seed, "windows": _windows(_losses(run)), **subject_score(run)})
    bf16 = [r["windows"] for r in arms["bf16"]]
    lows = [r["windows"] for r in arms["low_memory"]]
    spread = [(min(col), max(col)) for col in zip(*bf16)]
    inside = [all(lo <= w <= hi for w, (lo, hi) in zip(curve, spread)) for curve in lows]
    paired = [[round(a - b, 5) for a, b in zip(low, ref)] for low, ref in zip(lows, bf16)]
    seed_std = [statistics.stdev(col) for col in zip(*bf16)]
    # Per window: the largest paired difference over seeds, as a fraction of the seed-to-seed standard deviation.
    ratio = [round(max(abs(row[w]) for row in paired) / seed_std[w], 3) for w in range(len(seed_std))]
    result = {"task": "toy-world DreamBooth, UNet LoRA rank 4, Flat-LoRA sigma 0.1, bf16, CPU",
              "steps": args.steps, "window": WINDOW, "arms": arms,
              "paired_window_difference": paired, "bf16_seed_std_per_window": [round(v, 5) for v in seed_std],
              "paired_difference_over_seed_std": ratio, "guard_passed": max(ratio) < 1,
              "bf16_range_per_window": spread, "low_memory_inside_bf16_range": inside}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("paired_difference_over_seed_std", "guard_passed",
                                             "low_memory_inside_bf16_range")}))
    for arm, runs in arms.items():
        print(arm, [(r["seed"], r["subject"], r["scene"]) for r in runs])
    return 0 if result["guard_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
