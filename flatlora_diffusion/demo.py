"""`flatlora-diffusion demo`: the whole product on the toy world, in under a minute on two CPU cores (the two runs
train side by side, one per core).

It takes the project's own pretrained toy-world model (a small SD 1.x pipeline that draws coloured shapes in
scenes), renders five pictures of a subject it has never seen (a green striped toy, "sks toy": no pretraining
picture shows a green toy; always on the plain background), trains plain LoRA and Flat-LoRA with identical seeds (the same data order, diffusion noise and
timesteps: only the weight perturbation differs), and writes both run folders, comparison.png (the training
pictures, the base model, then each run, per prompt and seed) and scores.json: what the judge reads in the final validation
pictures (is the subject there, is the requested scene there, does the class prompt turn into the subject).

`--base tiny` (and `--arch sdxl`) train a tiny random-weight model instead: the same machinery, no meaning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .demo_workers import start_worker_server, train_side_by_side
from .toyworld.world import CLASS_PROMPT, SUBJECT_PROMPT, scene_prompt

# The subject in its own scene, in three scenes it was never shown in, and the class prompt (prior preservation).
TOYWORLD_PROMPTS = [SUBJECT_PROMPT, scene_prompt("beach"), scene_prompt("snow"), scene_prompt("night"), CLASS_PROMPT]
TINY_PROMPTS = [SUBJECT_PROMPT, "a sks toy on the beach"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatlora-diffusion demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="flatlora-demo", help="Folder for the data, both runs, comparison.png and scores.json.")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="sdxl: a tiny random SDXL model (the toy world is SD 1.x).")
    p.add_argument("--base", choices=["toyworld", "tiny"], default="toyworld",
                   help="toyworld: the pretrained toy-world model; tiny: a tiny random-weight model.")
    p.add_argument("--steps", type=int, default=100, help="Training steps of each run.")
    p.add_argument("--sigma", type=float, default=0.1, help="Flat-LoRA sigma of the second run.")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def run_config(model, images: Path, out: Path, sigma: float, args, class_images: Path | None = None) -> dict:
    """The settings of one demo run (the same for both but sigma)."""
    if class_images is not None:  # the toy world's DreamBooth task, and validation pictures the judge can read
        from .toyworld.measure import GUIDANCE, SAMPLE_STEPS
        from .toyworld.recipe import dreambooth_settings

        cfg = dreambooth_settings(out, images, class_images, flat_sigma=sigma, seed=args.seed, steps=args.steps)
        seeds = [0, 1]
        cfg.update(validation_prompt=TOYWORLD_PROMPTS, validation_seeds=seeds, validation_steps=args.steps,
                   validation_inference_steps=SAMPLE_STEPS, validation_guidance_scale=GUIDANCE,
                   sample_batch_size=len(TOYWORLD_PROMPTS) * len(seeds))  # a round's pictures in one batch
    else:  # the tiny random model
        cfg = {
            "pretrained_model_name_or_path": str(model), "instance_data_dir": str(images),
            "instance_prompt": SUBJECT_PROMPT, "output_dir": str(out), "resolution": args.resolution,
            "train_batch_size": 1, "max_train_steps": args.steps, "learning_rate": 5e-3, "lr_warmup_steps": 0,
            "rank": 4, "seed": args.seed, "flat_sigma": sigma, "train_text_encoder": True, "random_flip": True,
            "checkpointing_steps": 10**9, "validation_prompt": TINY_PROMPTS, "validation_seeds": [0, 1],
            "validation_steps": max(1, args.steps // 2), "validation_inference_steps": 8,
        }
    cfg["overwrite"] = True  # the demo owns its output folder: a second demo replaces the first
    return cfg


def _final_samples(run: Path) -> tuple[int, dict[str, str]]:
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "samples").glob("step_*") if (p / ".complete").exists())
    prompts = json.loads((run / "samples" / "prompts.json").read_text())
    return steps[-1], prompts


def _sample_rows(run: Path, prompts: dict[str, str], step: int) -> list[tuple[str, str]]:
    """(prompt index, seed) of each picture of `step`, prompt by prompt."""
    seeds = sorted({p.stem.split("_", 1)[1] for p in (run / "samples" / f"step_{step:06d}").glob("*.png")}, key=int)
    return [(p, s) for p in sorted(prompts, key=int) for s in seeds]


def comparison_image(runs: list[tuple[str, Path]], out_file: Path, instance_images: Path | None = None) -> Path:
    """Validation images of the runs side by side: the training pictures of the subject (when given: without
    them a viewer cannot tell what the runs should draw), a baseline column (step 0), then each run's final step."""
    from PIL import Image, ImageOps

    from .data.records import readable_images_in
    from .sample import comparison_grid

    first = runs[0][1]
    final_step, prompts = _final_samples(first)
    rows = _sample_rows(first, prompts, 0)
    size = Image.open(first / "samples" / "step_000000" / f"{rows[0][0]}_{rows[0][1]}.png").width
    # Demo images are 64 px: show them at least 160 px wide so the labels fit.
    shown = size * max(1, -(-160 // size))

    def enlarged(images):
        return [im.resize((shown, shown), Image.Resampling.NEAREST) for im in images]

    def column(run: Path, step: int):
        return enlarged(Image.open(run / "samples" / f"step_{step:06d}" / f"{p}_{s}.png").convert("RGB") for p, s in rows)

    columns = []
    if instance_images is not None:  # about as the trainer sees them: centre crop at the training size
        pictures = [ImageOps.fit(Image.open(f).convert("RGB"), (size, size), Image.Resampling.BICUBIC)
                    for f in readable_images_in(instance_images)[:len(rows)]]
        # "all N": the column is the whole training set from the top, not one picture per row's prompt.
        columns.append((f"all {len(pictures)} training pictures", enlarged(pictures)))
    columns += [("base model (step 0)", column(first, 0))]
    columns += [(f"{label} (step {final_step})", column(path, final_step)) for label, path in runs]
    grid = comparison_grid(columns, row_labels=[f"{prompts[p]} | seed {s}" for p, s in rows])
    tmp = out_file.with_name(out_file.name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(out_file)
    return out_file


def judge_samples(run: Path, step: int) -> dict:
    """What the judge reads in a run's validation pictures of one step: subject found (subject prompts), scene
    right (subject prompts that name a scene, and the plain one), and class prompt judged to be the subject."""
    from PIL import Image

    from .toyworld.judge import judge_images
    from .toyworld.world import SCENE_PHRASES

    prompts = json.loads((run / "samples" / "prompts.json").read_text())
    rows = _sample_rows(run, prompts, step)
    images = [Image.open(run / "samples" / f"step_{step:06d}" / f"{p}_{s}.png") for p, s in rows]
    verdicts = judge_images(images)
    phrase_to_scene = {phrase: scene for scene, phrase in SCENE_PHRASES.items()}
    subject, scene, leak = [], [], []
    for (p, _), v in zip(rows, verdicts):
        prompt = prompts[p]
        if prompt == CLASS_PROMPT:
            leak.append(v.subject)
            continue
        subject.append(v.subject)
        wanted = phrase_to_scene[prompt[len(SUBJECT_PROMPT):].strip()]
        scene.append(v.scene == wanted)
    return {"step": step, "subject": [sum(subject), len(subject)], "scene": [sum(scene), len(scene)],
            "class_is_subject": [sum(leak), len(leak)]}


def _print_scores(scores: dict[str, dict]) -> None:
    print(f"  {'judge of the final validation pictures':<38} {'subject':>9} {'scene':>9} {'class->subject':>15}")
    for label, s in scores.items():
        cells = [f"{a}/{b}" for a, b in (s["subject"], s["scene"], s["class_is_subject"])]
        print(f"  {label:<38} {cells[0]:>9} {cells[1]:>9} {cells[2]:>15}")


def _prepare_data(out: Path, args) -> tuple[str | Path, Path, Path | None]:
    """(model, instance images, class images or None) for the chosen base model."""
    if args.base == "toyworld" and args.arch == "sd15":
        from .toyworld import MODEL_NAME
        from .toyworld.recipe import write_task_data

        return (MODEL_NAME, *write_task_data(out, seed=args.seed))
    from .tiny import make_subject_images, make_tiny_pipeline

    model = out / f"tiny-{args.arch}"
    if not (model / "model_index.json").exists():
        make_tiny_pipeline(model, arch=args.arch, seed=args.seed)
    images = out / "subject"
    if not images.exists():
        make_subject_images(images, n=4, size=args.resolution * 2, seed=args.seed)
    return model, images, None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.sigma < 0 or args.resolution % 8:
        print("error: --steps must be >= 1, --sigma >= 0 and --resolution a multiple of 8", file=sys.stderr)
        return 2
    if args.base == "toyworld" and args.arch == "sd15" and args.resolution != 64:
        print("error: the toy world is 64 px: leave --resolution out, or use --base tiny", file=sys.stderr)
        return 2
    if Path(args.output).exists() and not Path(args.output).is_dir():
        print(f"error: --output {args.output} is a file; give a folder for the demo's runs (made if missing)",
              file=sys.stderr)
        return 2

    started = time.time()
    one_thread = "OMP_NUM_THREADS" not in os.environ
    # the cores this process may use (a container's CPU set, not the host's count)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = start_worker_server() if one_thread and cores >= 2 else None

    import torch

    if one_thread:
        # Small 64 px models gain nothing from more threads, and torch's spinning OpenMP threads made the demo
        # 5-60x slower whenever another process was busy on a 2-core machine (measured: 93 s vs 20 s).
        torch.set_num_threads(1)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, images, class_images = _prepare_data(out, args)
    runs = [("LoRA", out / "lora", 0.0), (f"Flat-LoRA sigma={args.sigma:g}", out / "flat-lora", args.sigma)]
    settings = [run_config(model, images, path, sigma, args, class_images) for _, path, sigma in runs]
    # Same base model, prompts and seeds: the step-0 (base model) pictures would be the same in both runs
    # (test_train.py: leaving them out changes nothing else), so only the first run has them. comparison.png and the
    # app take the baseline from there.
    settings[1]["validate_at_start"] = False
    if workers is not None and not torch.cuda.is_available():
        # On two cores a third process draws them beside the runs, and they are filed as the first run's step 0.
        settings[0]["validate_at_start"] = False
        drawn = out / "base-model-pictures"
        shutil.rmtree(drawn, ignore_errors=True)
        train_side_by_side(workers, runs, settings, out / "flat-lora.log", drawn)
        _file_as_step_zero(drawn, runs[0][1])
    else:
        from accelerate.state import AcceleratorState

        from .config import make_config
        from .console import setup_logging
        from .train import train

        setup_logging()  # the runs' own processes set theirs up (setting it up here imports diffusers: 3 s)

        for (label, path, _), cfg in zip(runs, settings):
            print(f"== training {label} -> {path}", file=sys.stderr)
            train(make_config(cfg))
            AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own Accelerator
    grid = comparison_image([(label, path) for label, path, _ in runs], out / "comparison.png", images)
    print(f"done in {time.time() - started:.0f} s")
    for label, path, _ in runs:
        print(f"  {label}: final loss {_last_loss(path):.4f}")
    if class_images is not None:
        final_step, _ = _final_samples(runs[0][1])
        scores = {"base model (step 0)": judge_samples(runs[0][1], 0)}
        scores.update({f"{label} (step {final_step})": judge_samples(path, final_step) for label, path, _ in runs})
        (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        _print_scores(scores)
    print(f"runs: {', '.join(str(p) for _, p, _ in runs)}\ncomparison: {grid}")
    return 0


def _file_as_step_zero(pictures: Path, run: Path) -> None:
    """The base model's pictures drawn beside the runs (demo_workers.draw_base_model_pictures) become the run's
    step-0 validation images, published whole as the trainer publishes its own (one rename, .complete inside)."""
    step_zero = run / "samples" / "step_000000"
    (pictures / ".complete").write_text("")
    shutil.rmtree(step_zero, ignore_errors=True)
    os.replace(pictures, step_zero)


def _last_loss(run: Path, window: int = 10) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()[-window:]
    values = [json.loads(line)["loss"] for line in lines if line.strip()]
    return sum(values) / len(values)
