"""The standard job, timed from process start to exit for both trainers, and what each trainer really did in it.

--job-steps at --job-batch, 4 validation images of one prompt every --job-validation-steps (diffusers' scripts:
the --validation_epochs that gives as many validations with a trained LoRA), a checkpoint every
--job-checkpointing-steps, the LoRA files at the end. The validation rounds, images and denoising steps come from
the events e2e_hooks.py's sitecustomize records; checkpoints and LoRA files from the run's folder.
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

from e2e_diffusers import diffusers_args
from e2e_hooks import hooked_env, read_events, read_floats
from e2e_models import gpu_figures
from e2e_runs import N_PICTURES, timed_run, train_args

VALIDATION_PROMPT = "a photo of sks toy on a beach"


def job_settings(args) -> dict:
    """results.json["job"] before its runs: the job both trainers run."""
    return {"steps": args.job_steps, "batch": args.job_batch,
            "validation_steps": args.job_validation_steps, "validation_images": 4,
            "validation_prompt": VALIDATION_PROMPT, "checkpointing_steps": args.job_checkpointing_steps,
            "validation_share_from": "our trainer's validation rounds (Trainer._make_validation_images) "
                                     "timed by the sitecustomize hook, over the job's wall time",
            "runs": []}


def diffusers_validation_epochs(steps: int, batch: int, rounds: int) -> tuple[int, int]:
    """--validation_epochs V for diffusers' scripts so that they validate `rounds` times with a trained LoRA, as ours
    does after step 0. They validate after every epoch e = 0, 1, ... with e % V == 0 (epoch 0 always) and once more
    after training (the final inference: same prompt, same number of images). Returns (V, the rounds it gives)."""
    epochs = math.ceil(steps / math.ceil(N_PICTURES / batch))
    made = {v: (epochs - 1) // v + 1 + 1 for v in range(1, epochs + 1)}
    best = min(made, key=lambda v: (abs(made[v] - rounds), v))
    return best, made[best]


def job_summary(out: Path, run: dict, times: list[float], events: list[dict]) -> dict:
    """What a job run did: its validation rounds (one pipeline object each; after_step: the optimizer steps done
    before it), images, denoising steps, checkpoints and LoRA files, for ours the time its rounds took, and on a
    GPU the SM clock, temperature and power during each round and the whole run (GpuClocks)."""
    rounds: dict[int, dict] = {}
    spans: dict[int, list[float]] = {}  # each round's denoising, first start to last end: its GPU clock's window
    for e in (e for e in events if e["event"] == "denoise"):
        r = rounds.setdefault(e["pipeline"], {"after_step": bisect.bisect_right(times, e["start"]), "images": 0,
                                              "denoising_steps": set(), "denoise_s": 0.0})
        r["images"] += e.get("images", 1)
        r["denoising_steps"].add(e["steps"])
        r["denoise_s"] += e["end"] - e["start"]
        spans.setdefault(e["pipeline"], []).extend([e["start"], e["end"]])
    windows = [e for e in events if e["event"] == "validation"]  # ours: a whole round, pipeline to PNG files
    gaps = [b - a for a, b in zip(times, times[1:])]
    typical = statistics.median(gaps) if gaps else 0.0
    for key, r in rounds.items():
        r.update(gpu_figures(run["clocks"], min(spans[key]), max(spans[key])))
        r["denoising_steps"] = sorted(r["denoising_steps"])
        r["denoise_s"] = round(r["denoise_s"], 2)
        for e in windows:
            if e["step"] == r["after_step"]:
                r["validation_s"] = round(e["end"] - e["start"], 2)
        step = r["after_step"]
        if not windows and 0 < step < len(times):  # diffusers' in-loop rounds: the step gap they sit in, less a step
            r["validation_s_from_step_gap"] = round(times[step] - times[step - 1] - typical, 2)
    checkpoints = sorted((p for p in [*out.glob("checkpoint-*"), *out.glob("checkpoints/checkpoint-*")] if p.is_dir()),
                         key=lambda p: int(p.name.split("-")[1]))
    summary = {"job_wall_s": round(run["wall"], 1), "peak_mib": run["peak"], "steps_timed": len(times),
               "validation_rounds": [rounds[k] for k in sorted(rounds)],
               "validation_images": sum(r["images"] for r in rounds.values()),
               "validation_pngs_on_disk": len(list(out.glob("samples/step_*/*.png"))),
               "tensorboard_event_files": len(list(out.glob("logs/**/events.out.tfevents*"))),
               "checkpoints": [p.name for p in checkpoints],
               "lora_files": sorted(p.name for p in out.glob("*.safetensors")),
               "after_last_step_s": round(run["end"] - times[-1], 1) if times else None,
               # Start-up: process start to the first optimizer step (imports, loading, caches, warm-up, step 0's
               # validation round for ours: validation_s_step0 says how much of it that round was).
               "before_first_step_s": round(times[0] - run["start"], 1) if times else None,
               **gpu_figures(run["clocks"])}
    if windows:
        total = sum(e["end"] - e["start"] for e in windows)
        summary["validation_s"] = round(total, 1)
        summary["validation_share"] = round(total / run["wall"], 3)
        summary["validation_s_step0"] = round(sum(e["end"] - e["start"] for e in windows if e["step"] == 0), 1)
    return summary


def run_job(args, model, images, trainer: str) -> dict:
    """The standard job: --job-steps at --job-batch, validation (4 images of one prompt) every
    --job-validation-steps, a checkpoint every --job-checkpointing-steps, the LoRA files at the end."""
    out = Path(args.out) / "runs" / f"job-{trainer}"
    validation = ["--validation_prompt", VALIDATION_PROMPT, "--num_validation_images", "4"]
    checkpoints = ["--checkpointing_steps", str(args.job_checkpointing_steps)]
    row: dict = {"label": trainer, "batch": args.job_batch, "steps": args.job_steps}
    if trainer == "diffusers":
        shutil.rmtree(out, ignore_errors=True)
        wanted = math.ceil(args.job_steps / args.job_validation_steps)
        epochs, rounds = diffusers_validation_epochs(args.job_steps, args.job_batch, wanted)
        row.update(validation_epochs=epochs, validation_rounds_planned=rounds, validation_rounds_wanted=wanted)
        cmd, dropped = diffusers_args(Path(args.diffusers_script), model, images, out, args.arch, args.job_batch,
                                      args.job_steps, args.flags.split(),
                                      job=[*validation, "--validation_epochs", str(epochs), *checkpoints])
        row["flags_without_counterpart"] = dropped
        env, times_file, events_file = hooked_env(args, out, sync=True)
    else:
        row["sigma"] = args.job_sigma
        cmd = [sys.executable, "-m", "flatlora_diffusion.cli", "train",
               *train_args(model, images, out, args.arch, args.job_batch, args.job_sigma, args.job_steps,
                           args.flags.split(),
                           job=[*validation, "--validation_steps", str(args.job_validation_steps), *checkpoints])]
        env, times_file, events_file = hooked_env(args, out, sync=False)  # ours reads its loss one step late
    run = timed_run(cmd, env, out.with_name(out.name + ".log"))
    if run["rc"]:
        row["error"] = run["log"][-1500:]
        return row
    row.update(job_summary(out, run, read_floats(times_file), read_events(events_file)))
    print(json.dumps(row), flush=True)
    return row
