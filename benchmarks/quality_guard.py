"""Quality guards of the changes that alter training's numerics (issue 20): does the change alter training?

    OMP_NUM_THREADS=1 python benchmarks/quality_guard.py --change low_memory|bf16_norms|fused_lora [--workdir DIR]
        [--seeds 3] [--steps 100]

On the toy world's DreamBooth task (toyworld/recipe.py: 5 subject renders, prior preservation, rank 4, lr 5e-3,
Flat-LoRA sigma 0.1), UNet LoRA only, in bf16 mixed precision on the CPU: for each training seed one run without
the change (the reference arm) and one with it. The changes:

- low_memory (part 4): the base weights as shipped (fp16 on disk, bf16 compute) against --low_memory (float8
  storage, bf16 compute, gradient checkpointing). The toy world is a real pretrained model, so its weights'
  float8 rounding is the kind a real checkpoint gets.
- bf16_norms (part 3): the UNet's GroupNorm and LayerNorm returning fp32, as CUDA autocast makes them (CPU autocast
  leaves them in bf16, so the reference arm computes them in fp32 and returns fp32 explicitly: every consumer then
  casts back, as on a GPU) against --bf16_norms (norms.py: bf16 in, bf16 out).
- fused_lora (part 3): peft's LoRA layers (--no_fused_lora) against fused_lora.py's (up projection, scaling and
  sum in one addmm), both arms with the trainer's other defaults.

The guard: in every window of 10 steps, the change's effect on the loss (the paired difference, change minus
reference with the same training seed: same data order, timesteps and noise) is smaller than the reference runs'
seed-to-seed spread (their standard deviation over the training seeds in that window). Whether a run's curve lies
inside min..max of the reference curves is reported too, but it is no test: each run tracks its twin, which is
often itself the edge of three seeds' range. Also reported: each final LoRA's toy-world subject score (the judge,
the demo's prompts and seeds) so that "same loss, worse pictures" would show.

Writes benchmarks/results/{low_memory,bf16_norms,fused_lora}_quality.json (the committed ones: 3 seeds, 100 steps, 2-core
CPU).
"""

from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def cuda_autocast_norms():
    """GroupNorm and LayerNorm as CUDA autocast runs them: fp32 in, fp32 out (CPU autocast keeps them in bf16)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def fp32(t):
        return None if t is None else t.float()

    originals = nn.GroupNorm.forward, nn.LayerNorm.forward

    def group_norm(self, x):
        if not torch.is_autocast_enabled(x.device.type):  # outside autocast a norm computes in its input's dtype
            return originals[0](self, x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, fp32(self.weight), fp32(self.bias), self.eps)

    def layer_norm(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            return originals[1](self, x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, fp32(self.weight), fp32(self.bias), self.eps)

    nn.GroupNorm.forward, nn.LayerNorm.forward = group_norm, layer_norm
    try:
        yield
    finally:
        nn.GroupNorm.forward, nn.LayerNorm.forward = originals


# change -> (reference arm, changed arm); each arm: (train settings, the context it trains in)
CHANGES = {
    "low_memory": {"bf16": ({"low_memory": False}, contextlib.nullcontext),
                   "low_memory": ({"low_memory": True}, contextlib.nullcontext)},
    "bf16_norms": {"fp32_norms": ({"bf16_norms": False}, cuda_autocast_norms),
                   "bf16_norms": ({"bf16_norms": True}, contextlib.nullcontext)},
    "fused_lora": {"peft_lora": ({"fused_lora": False}, contextlib.nullcontext),
                   "fused_lora": ({"fused_lora": True}, contextlib.nullcontext)},
}


def train_arm(workdir: Path, instance: Path, classes: Path, seed: int, steps: int, arm: str, change: str) -> Path:
    from accelerate.state import AcceleratorState

    from flatlora_diffusion.config import make_config
    from flatlora_diffusion.toyworld.recipe import dreambooth_settings
    from flatlora_diffusion.train import train

    out = workdir / f"{arm}-seed{seed}"
    if (out / "pytorch_lora_weights.safetensors").exists():
        return out  # reused: an interrupted guard continues
    over, context = CHANGES[change][arm]
    settings = dreambooth_settings(out, instance, classes, flat_sigma=0.1, seed=seed, steps=steps)
    settings.update(train_text_encoder=False, mixed_precision="bf16", overwrite=True, **over)
    with context():
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
    ap.add_argument("--change", required=True, choices=sorted(CHANGES))
    ap.add_argument("--workdir", default=None, help="Default: /tmp/quality_guard_CHANGE")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--output", default=None, help="Default: benchmarks/results/CHANGE_quality.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flatlora_diffusion.toyworld.recipe import write_task_data

    workdir = Path(args.workdir or f"/tmp/quality_guard_{args.change}")
    output = Path(args.output or REPO / "benchmarks" / "results" / f"{args.change}_quality.json")
    instance, classes = write_task_data(workdir / "data")
    reference, changed = CHANGES[args.change]
    arms: dict[str, list[dict]] = {reference: [], changed: []}
    for seed in range(args.seeds):
        for arm in arms:
            run = train_arm(workdir, instance, classes, seed, args.steps, arm, args.change)
            arms[arm].append({"seed": seed, "windows": _windows(_losses(run)), **subject_score(run)})
    refs = [r["windows"] for r in arms[reference]]
    curves = [r["windows"] for r in arms[changed]]
    spread = [(min(col), max(col)) for col in zip(*refs)]
    inside = [all(lo <= w <= hi for w, (lo, hi) in zip(curve, spread)) for curve in curves]
    paired = [[round(a - b, 5) for a, b in zip(curve, ref)] for curve, ref in zip(curves, refs)]
    seed_std = [statistics.stdev(col) for col in zip(*refs)]
    # Per window: the largest paired difference over seeds, as a fraction of the seed-to-seed standard deviation.
    ratio = [round(max(abs(row[w]) for row in paired) / seed_std[w], 3) for w in range(len(seed_std))]
    result = {"task": "toy-world DreamBooth, UNet LoRA rank 4, Flat-LoRA sigma 0.1, bf16, CPU",
              "change": args.change, "steps": args.steps, "window": WINDOW, "arms": arms,
              "paired_window_difference": paired, f"{reference}_seed_std_per_window": [round(v, 5) for v in seed_std],
              "paired_difference_over_seed_std": ratio, "guard_passed": max(ratio) < 1,
              f"{reference}_range_per_window": spread, f"{changed}_inside_{reference}_range": inside}
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("paired_difference_over_seed_std", "guard_passed",
                                             f"{changed}_inside_{reference}_range")}))
    for arm, runs in arms.items():
        print(arm, [(r["seed"], r["subject"], r["scene"]) for r in runs])
    return 0 if result["guard_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
