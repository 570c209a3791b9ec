"""How well the toy world works, read by the judge: on renders, on the base model, on a trained LoRA.

    python -m flatlora_diffusion.toyworld.measure [--model DIR] [--judge DIR] [--per-split N] [--device cuda]
        [--output FILE]

prints (and writes) the judge's accuracy on fresh renders and the base model's prompt following on seen
and held-out shape-colour pairs. The same functions score a DreamBooth run (subject_scores).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter

import torch

from .judge import HEADS, Judge, judge_images, load_judge, to_model_range
from .render import eye_mask, render
from .world import CLASS_PROMPT, SCENES, caption, has_subject_look, random_scene, scene_prompt, subject_scene

# Sampling settings every toy-world score uses (the demo and the tests too): scores of two runs compare only
# when their pictures are made the same way.
SAMPLE_STEPS = 20
GUIDANCE = 5.0
# Render seeds of measurements are far from the pretraining seeds (0 and 1), so that no measured render was seen.
MEASURE_SEED = 1000


def generate_batch(pipe, prompts: list[str], seeds: list[int], steps: int = SAMPLE_STEPS,
                   guidance: float = GUIDANCE, batch_size: int = 32):
    """One picture per (prompt, seed) pair, generated in batches. Each picture's starting noise comes from its
    own CPU generator, so a picture depends on its prompt and seed, not on the batch it was made in."""
    from diffusers import DPMSolverMultistepScheduler

    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(prompt=prompts[chunk], generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                   height=64, width=64, output_type="pil")
        images += out.images
    return images


def _rate(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else float("nan")


def judge_accuracy(judge: Judge, n: int, seed: int = MEASURE_SEED) -> dict:
    """The judge's accuracy per attribute on n fresh renders (a fifth of them the subject, in every scene)."""
    rng = random.Random(f"judge-accuracy:{seed}")
    scenes = [subject_scene(rng, rng.choice(SCENES)) if i % 5 == 0 else random_scene(rng, held_out=None)
              for i in range(n)]
    verdicts = judge_images([render(s) for s in scenes], judge)
    result = {name: _rate(getattr(v, name) == getattr(s, name) for v, s in zip(verdicts, scenes)) for name in HEADS}
    # A random scene can be a green striped toy too: the subject is what it looks like.
    result["subject"] = _rate(v.subject == has_subject_look(s) for v, s in zip(verdicts, scenes))
    result["renders"] = n
    return result


@torch.no_grad()
def vae_round_trip(vae, n: int = 40, device="cpu", seed: int = MEASURE_SEED) -> dict:
    """How much of a toy's small features a VAE keeps: mean absolute error (0-255 levels) of encode-decode (latent
    mean) on n renders of the subject's toy with big eyes, in every scene, over the eye pixels (render.eye_mask)
    and over the whole picture. Eyes of a few pixels are the smallest thing a toy has (they defined the world's
    first subject); a VAE that smooths them away gives a LoRA latents without them to learn from."""
    import dataclasses

    import numpy as np

    rng = random.Random(f"vae-round-trip:{seed}")
    scenes = [dataclasses.replace(subject_scene(rng, SCENES[i % len(SCENES)]), subject=False, big_eyes=True)
              for i in range(n)]
    pixels = torch.from_numpy(np.stack([np.asarray(render(s), dtype=np.uint8) for s in scenes]))
    x = to_model_range(pixels).to(device)
    dtype = next(vae.parameters()).dtype
    recon = vae.decode(vae.encode(x.to(dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    error = (recon - x).abs().mean(1).cpu() * 127.5  # (n, H, W) levels
    eyes = torch.from_numpy(np.stack([eye_mask(s) for s in scenes]))
    return {"eye_error": round(error[eyes].mean().item(), 2), "image_error": round(error.mean().item(), 2),
            "renders": n}


def prompt_following(pipe, judge: Judge, n: int, held_out: bool, seed: int = MEASURE_SEED) -> dict:
    """Generate n pictures from canonical captions of random scenes (held-out shape-colour pairs or seen ones)
    and read whether the judge sees the shape, colour, pattern and scene asked for."""
    rng = random.Random(f"prompt-following:{seed}:{held_out}")
    scenes = [random_scene(rng, held_out=held_out) for _ in range(n)]
    images = generate_batch(pipe, [caption(s) for s in scenes], [seed + i for i in range(n)])
    verdicts = judge_images(images, judge)
    result = {name: _rate(getattr(v, name) == getattr(s, name) for v, s in zip(verdicts, scenes)) for name in HEADS}
    result["all_three"] = _rate(v.shape == s.shape and v.colour == s.colour and v.scene == s.scene
                                for v, s in zip(verdicts, scenes))
    # How often the subject's look is drawn when the prompt asked for something else (a held-out prompt for a
    # green striped toy asks for that look, and gets it when the base model composes well).
    result["subject_seen"] = _rate(v.subject for v, s in zip(verdicts, scenes) if not has_subject_look(s))
    result["samples"] = n
    return result


def class_prompt_profile(pipe, judge: Judge, n: int, seed: int = MEASURE_SEED) -> dict:
    """What "a photo of a toy" draws: how often a toy, how often the subject, and the colour distribution."""
    images = generate_batch(pipe, [CLASS_PROMPT] * n, [seed + i for i in range(n)])
    verdicts = judge_images(images, judge)
    colours = Counter(v.colour for v in verdicts if not v.subject)
    return {"toy": _rate(v.shape == "toy" for v in verdicts), "subject": _rate(v.subject for v in verdicts),
            "colours": {c: round(colours[c] / n, 4) for c in sorted(colours)}, "samples": n}


def subject_scores(pipe, judge: Judge, scenes: list[str], seeds: list[int]) -> dict:
    """DreamBooth scores of the pipeline as it is (LoRA loaded or not): for "a photo of sks toy <scene>", how
    often the judge sees the subject, the scene asked for, and both; per scene and overall."""
    prompts = [scene_prompt(s) for s in scenes for _ in seeds]
    images = generate_batch(pipe, prompts, [seed for _ in scenes for seed in seeds])
    verdicts = judge_images(images, judge)
    per_scene = {}
    for k, scene in enumerate(scenes):
        vs = verdicts[k * len(seeds):(k + 1) * len(seeds)]
        per_scene[scene] = {"subject": _rate(v.subject for v in vs), "scene": _rate(v.scene == scene for v in vs)}
    wanted = [s for s in scenes for _ in seeds]
    return {"subject": _rate(v.subject for v in verdicts),
            "scene": _rate(v.scene == w for v, w in zip(verdicts, wanted)),
            "subject_and_scene": _rate(v.subject and v.scene == w for v, w in zip(verdicts, wanted)),
            "per_scene": per_scene, "samples": len(verdicts)}


def measure_base(pipe, judge: Judge, per_split: int, judge_renders: int) -> dict:
    return {"judge_on_renders": judge_accuracy(judge, judge_renders),
            "seen_pairs": prompt_following(pipe, judge, per_split, held_out=False),
            "held_out_pairs": prompt_following(pipe, judge, per_split, held_out=True),
            "class_prompt": class_prompt_profile(pipe, judge, per_split // 2),
            "subject_prompt_before_training": subject_scores(pipe, judge, list(SCENES), list(range(per_split // 10 or 1))),
            "settings": {"sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE, "seed": MEASURE_SEED}}


def measure_dreambooth(folder, judge: Judge, seeds_per_scene: int, class_samples: int, sigma: float = 0.1,
                       train_seed: int = 0, model: str | None = None, device: str = "cpu",
                       recipe_changes: dict | None = None) -> dict:
    """Train the toy world's DreamBooth task (recipe.py) as LoRA and as Flat-LoRA with one training seed, and
    score the base model and both LoRAs on the subject in every scene and on the class prompt.
    `recipe_changes`: training settings that replace the recipe's (a trial of another recipe)."""
    from pathlib import Path

    from accelerate.state import AcceleratorState
    from diffusers import StableDiffusionPipeline

    from ..config import make_config
    from ..sample import lora_loaded
    from ..train import train
    from . import MODEL_NAME, model_dir
    from .recipe import dreambooth_settings, write_task_data

    folder = Path(folder)
    instance, classes = write_task_data(folder / "data", seed=train_seed, model=model or MODEL_NAME)
    pipe = StableDiffusionPipeline.from_pretrained(model or str(model_dir()), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    seeds = [MEASURE_SEED + i for i in range(seeds_per_scene)]

    def scores() -> dict:
        return {"subject_prompts": subject_scores(pipe, judge, list(SCENES), seeds),
                "class_prompt": class_prompt_profile(pipe, judge, class_samples)}

    result = {"base model": scores()}
    for label, sigma_run in (("LoRA", 0.0), (f"Flat-LoRA sigma={sigma:g}", sigma)):
        out = folder / ("lora" if sigma_run == 0 else "flat-lora")
        settings = dreambooth_settings(out, instance, classes, flat_sigma=sigma_run, seed=train_seed,
                                       model=model or MODEL_NAME)
        train(make_config({**settings, **(recipe_changes or {}), "overwrite": True}))
        AcceleratorState._reset_state(reset_partial_state=True)
        with lora_loaded(pipe, out / "pytorch_lora_weights.safetensors"):
            result[label] = scores()
    result["settings"] = {"seeds_per_scene": seeds_per_scene, "class_samples": class_samples, "train_seed": train_seed,
                          "sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE, "recipe_changes": recipe_changes or {}}
    return result


def main(argv: list[str] | None = None) -> int:
    from . import model_dir

    p = argparse.ArgumentParser(prog="python -m flatlora_diffusion.toyworld.measure", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Pipeline folder (default: the shipped toy-world model).")
    p.add_argument("--judge", default=None, help="Judge folder (default: the shipped judge).")
    p.add_argument("--per-split", type=int, default=200, help="Generated pictures per split.")
    p.add_argument("--judge-renders", type=int, default=2000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", help="Write the result as JSON here.")
    p.add_argument("--dreambooth", metavar="DIR",
                   help="Instead: train the toy world's DreamBooth task as LoRA and Flat-LoRA in DIR and score them "
                        "(--per-split pictures per scene of the subject prompt, as many of the class prompt).")
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help="With --dreambooth: training settings that replace the recipe's, for trials.")
    args = p.parse_args(argv)
    if args.dreambooth:
        from ..config import ConfigError

        try:
            changes = _recipe_changes(args.recipe)
            result = measure_dreambooth(args.dreambooth, load_judge(args.judge) if args.judge else load_judge(),
                                        args.per_split, args.per_split, model=args.model, device=args.device,
                                        recipe_changes=changes)
        except ConfigError as e:
            print(f"error: --recipe: {e}", file=sys.stderr)
            return 2
        return _emit(result, args.output)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model or str(model_dir()), dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False).to(args.device)
    judge = load_judge(args.judge) if args.judge else load_judge()
    return _emit(measure_base(pipe, judge, args.per_split, args.judge_renders), args.output)


def _recipe_changes(items: list[str]) -> dict:
    """--recipe KEY=VALUE items as training settings (values as on the train command line; make_config
    converts them). Unknown names are refused here, before any model loads."""
    from ..config import ConfigError, check_setting_name

    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r} is not KEY=VALUE")
        check_setting_name(key)
        changes[key] = value
    return changes


def _emit(result: dict, output: str | None) -> int:
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["SAMPLE_STEPS", "GUIDANCE", "generate_batch", "judge_accuracy", "vae_round_trip", "prompt_following",
           "class_prompt_profile", "subject_scores", "measure_base", "measure_dreambooth"]
