"""diffusers' DreamBooth LoRA scripts next to ours: their command line, a timed run, and what differs.

diffusers_args() gives train_dreambooth_lora(_sdxl).py the flags both trainers share plus those of `--flags` the
script knows (the others are left out and listed); run_diffusers() times one run of it, steady ms/step from the
optimizer-step hook of e2e_hooks.py; script_facts() and differences() are what results.json["diffusers"] says.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

from e2e_hooks import hooked_env, read_floats
from e2e_runs import shared_args, steady_ms_of, timed_run

def diffusers_args(script: Path, model: Path, images: Path, out: Path, arch: str, batch: int, steps: int,
                   flags: list[str], job: list[str] | None = None) -> tuple[list[str], list[str]]:
    """diffusers' command line, and the flags of `flags` its script lacks (left out). --report_to stays at its
    default, tensorboard: accelerate refuses "none", and without tensorboard installed no tracker is made."""
    known = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', script.read_text()))
    kept, dropped = [], []
    for group in flag_groups(flags):
        (kept if group[0].split("=")[0] in known else dropped).extend(group)
    return [sys.executable, str(script), *shared_args(model, images, out, arch, batch, steps),
            *(job or ["--checkpointing_steps", "100000"]), *kept], dropped


def flag_groups(flags: list[str]) -> list[list[str]]:
    """["--a", "1", "--b"] -> [["--a", "1"], ["--b"]]."""
    groups: list[list[str]] = []
    for token in flags:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def run_diffusers(args, model, images, batch) -> dict:
    """diffusers' script, same flags: steady ms/step from the optimizer-step timestamps (synchronised)."""
    out = Path(args.out) / "runs" / f"diffusers-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cmd, dropped = diffusers_args(Path(args.diffusers_script), model, images, out, args.arch, batch, args.steps,
                                  args.flags.split())
    env, times_file, _ = hooked_env(args, out, sync=True)
    run = timed_run(cmd, env, out.with_name(out.name + ".log"))
    times = read_floats(times_file)
    if run["rc"] or len(times) < 3:
        return {"label": "diffusers", "batch": batch, "error": run["log"][-1500:], "steps_timed": len(times)}
    ms = steady_ms_of(times)
    row = {"label": "diffusers", "batch": batch, "sigma": None, "ms_per_step": round(ms, 1),
           "images_per_s": round(1000 * batch / ms, 2), "job_wall_s": round(run["wall"], 1), "peak_mib": run["peak"],
           "steps_timed": len(times), "flags_without_counterpart": dropped}
    print(json.dumps(row), flush=True)
    return row


def script_facts(args) -> dict:
    """Which script ran (name, diffusers' version, the version it asks for, a hash of its text) and differences()."""
    from importlib.metadata import version

    text = Path(args.diffusers_script).read_text()
    found = re.search(r'check_min_version\("([^"]+)"\)', text)
    return {"script": Path(args.diffusers_script).name, "version": version("diffusers"),
            "script_check_min_version": found and found.group(1),
            "script_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "differences": differences(args)}


def differences(args) -> list[str]:
    """What differs between the two command lines and jobs (the rows record what each did)."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    notes = ["ours only: --overwrite, --flat_sigma (diffusers: plain LoRA), --report_to none (diffusers keeps its "
             f"default tensorboard, accelerate refuses 'none'; tensorboard installed here: {tensorboard})"]
    if args.arch == "sd15":
        notes.append("both: --pre_compute_text_embeddings (ours does so by default, diffusers' SDXL script always)")
    dropped = diffusers_args(Path(args.diffusers_script), Path("m"), Path("i"), Path("o"), args.arch, 1, 1,
                             args.flags.split())[1]
    if dropped:
        notes.append(f"no counterpart in diffusers' script, given to ours only: {' '.join(dropped)}"
                     + (" (diffusers encodes the pictures with the VAE at every step)" if "--cache_latents" in dropped
                        else ""))
    notes.append("steady ms/step: ours from metrics.jsonl; diffusers' from torch's optimizer step post-hook after "
                 "torch.cuda.synchronize() (its loop reads the loss with .item() every step anyway)")
    if args.job:
        notes += ["job: ours validates every --validation_steps, at step 0 (the untrained baseline) and at the last "
                  "step; diffusers' after every --validation_epochs-th epoch (epoch 0 included, none at step 0) and "
                  "once more after training (the final inference, with the saved LoRA)",
                  "job: validation images: ours 25 denoising steps, guidance 7.0, PNG files in samples/; diffusers' "
                  "the pipeline's defaults in the loop (50 steps; guidance 5.0 SDXL, 7.5 SD) and 25 steps at the end, "
                  "kept only by trackers (tensorboard, when installed: tensorboard_event_files)",
                  "job: ours saves no checkpoint at the last step (it writes the LoRA files instead), diffusers' "
                  "does; ours also writes a kohya-format LoRA file by default"]
    return notes
