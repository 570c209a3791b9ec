"""The three parts of the multi-GPU table, each a list of trainer runs and what they show.

scaling():     per sigma and N: steady images/s of the whole job (all processes), the efficiency against one GPU
               at the same per-GPU batch, whether the CUDA graph and the fused Flat-LoRA path ran (from the log).
               One GPU twice: as users run it (CUDA graph on) and with --cuda_graph off, because several processes
               cannot replay a graph (DDP's hooks), so only the second pair compares like with like.
correctness(): A = 1 process with --gradient_accumulation_steps N, B = N processes, both per-process batch b
               and --flat_share_noise_across_ranks: the same global batch of the same loader batches (accelerate
               gives process r the batches r, r + N, ...; one process takes them as micro-batches 0..N-1), the
               same diffusion noise (step.step_generator keys a micro-batch by that place) and the same Flat-LoRA
               noise, so their LoRA files differ only by the order in which gradients are summed. C = B without
               the flag: the same comparison with each process's own Flat-LoRA noise, the scale a real
               difference has; its log's per-process noise fingerprints must all differ, B's all be equal.
resume():      B's folder as a crash after its checkpoint leaves it (the LoRA files and later samples removed),
               resumed with N processes and with another count; each must reach the final step and write its
               files once; the N-process resume is compared with B's own final LoRA.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from e2e_job import VALIDATION_PROMPT
from e2e_runs import steady_ms, train_args
from mgpu_launch import launch
from mgpu_outputs import LORA_FILE, all_written_once, lora_diff, written_once

SHARE = "--flat_share_noise_across_ranks"


def _tail(run: dict) -> str:
    return run["log"][-1500:]


def _facts(run: dict) -> dict:
    keys = ("cuda_graph", "cuda_graph_log", "flat_fused", "flat_path_log", "noise_fingerprints", "command")
    return {"job_wall_s": round(run["wall"], 1), "peak_mib_gpu0": run["peak"], **{k: run[k] for k in keys}}


# --------------------------------------------------------------------------------------------------------- scaling
def scaling(ctx, part: dict) -> None:
    """Fills part["rows"] run by run (saved after each), then the efficiencies."""
    rows = part["rows"]
    eager = ctx.eager_baseline and torch.cuda.is_available()  # on a CPU there is no graph to turn off
    variants = [("default", [])] + ([("graph off", ["--cuda_graph", "off"])] if eager else [])
    for sigma in ctx.sigmas:
        for n in ctx.gpus:
            for label, extra in (variants if n == 1 else [("default", [])]):
                out = ctx.runs / f"scale-n{n}-s{sigma}{'-eager' if extra else ''}"
                argv = train_args(ctx.model, ctx.images, out, ctx.arch, ctx.batch, sigma, ctx.steps,
                                  [*ctx.flags, *extra])
                run = launch(n, argv, out)
                row = {"processes": n, "variant": label, "sigma": sigma, "batch_per_process": ctx.batch}
                if run["rc"]:
                    rows.append({**row, "error": _tail(run)})
                    ctx.save()
                    continue
                ms = steady_ms(out / "metrics.jsonl")
                checks = written_once(out, ctx.steps, [], [], 0, n)
                rows.append({**row, "ms_per_step": round(ms, 1), "images_per_s": round(1000 * ctx.batch * n / ms, 2),
                             "written_once": all_written_once(checks), "checks": checks, **_facts(run)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("checks", "command")}), flush=True)
                ctx.save()
    part.update(efficiency=efficiency(rows), threshold=0.9)


def efficiency(rows: list[dict]) -> list[dict]:
    """images/s at N over N x images/s at 1, per sigma, against each one-GPU variant."""
    ones = {(r["sigma"], r["variant"]): r for r in rows if r["processes"] == 1 and "images_per_s" in r}
    out = []
    for r in rows:
        if r["processes"] == 1 or "images_per_s" not in r:
            continue
        for (sigma, variant), one in ones.items():
            if sigma == r["sigma"]:
                e = r["images_per_s"] / (r["processes"] * one["images_per_s"])
                out.append({"processes": r["processes"], "sigma": sigma, "against_1_gpu": variant,
                            "efficiency": round(e, 3), "meets_0.9": e >= 0.9})
    return out


# ----------------------------------------------------------------------------------------------------- correctness
def check_schedule(ctx) -> tuple[list[int], list[int]]:
    """(validation steps, checkpoint steps) of the check runs: every --check-every steps, validation also at 0
    and at the end, a checkpoint never at the end (the trainer writes the LoRA files there instead)."""
    every, steps = ctx.check_every, ctx.check_steps
    return sorted({0, *range(every, steps + 1, every), steps}), list(range(every, steps, every))


def check_argv(ctx, out: Path, extra: list[str]) -> list[str]:
    job = ["--checkpointing_steps", str(ctx.check_every), "--validation_prompt", VALIDATION_PROMPT,
           "--num_validation_images", "1", "--validation_steps", str(ctx.check_every),
           "--validation_inference_steps", "2"]
    return train_args(ctx.model, ctx.images, out, ctx.arch, ctx.batch, ctx.check_sigma, ctx.check_steps,
                      [*ctx.flags, *extra], job=job)


def _check_run(ctx, name: str, processes: int, extra: list[str]) -> tuple[Path, dict]:
    out = ctx.runs / name
    run = launch(processes, check_argv(ctx, out, extra), out)
    row = {"processes": processes, "flags": extra}
    if run["rc"]:
        return out, {**row, "error": _tail(run)}
    validations, checkpoints = check_schedule(ctx)
    checks = written_once(out, ctx.check_steps, validations, checkpoints, 1, processes)
    return out, {**row, "written_once": all_written_once(checks), "checks": checks, **_facts(run)}


def correctness(ctx) -> dict:
    n = ctx.check_n
    result = {"processes": n, "batch_per_process": ctx.batch, "steps": ctx.check_steps, "sigma": ctx.check_sigma,
              "tolerance_rel_fro": ctx.tolerance, "runs": {}}
    outs = {}
    for name, procs, extra in (("A", 1, ["--gradient_accumulation_steps", str(n), SHARE]), ("B", n, [SHARE]),
                               ("C", n, [])):
        outs[name], result["runs"][name] = _check_run(ctx, f"check-{name}", procs, extra)
        ctx.save()
    if any("error" in r for r in result["runs"].values()):
        return result
    ab = lora_diff(outs["A"] / LORA_FILE, outs["B"] / LORA_FILE)
    ac = lora_diff(outs["A"] / LORA_FILE, outs["C"] / LORA_FILE)
    fb, fc = result["runs"]["B"]["noise_fingerprints"] or [], result["runs"]["C"]["noise_fingerprints"] or []
    result.update({
        "A_vs_B": ab, "A_vs_C": ac,
        "shared_noise_equal_on_all_processes": len(fb) == n and len(set(fb)) == 1,
        "own_noise_differs_on_every_process": len(fc) == n and len(set(fc)) == n,
        "A_equals_B": "rel_fro" in ab and ab["rel_fro"] <= ctx.tolerance,
        # the difference a different noise makes must dwarf the summation order's, or the check shows nothing
        "B_much_closer_than_C": "rel_fro" in ab and "rel_fro" in ac and ab["rel_fro"] * 10 <= ac["rel_fro"],
    })
    return result


# ---------------------------------------------------------------------------------------------------------- resume
def crash_after_checkpoint(src: Path, dst: Path, checkpoint_step: int) -> None:
    """dst = src as a crash just after its checkpoint leaves it: no LoRA files, no later samples."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for p in dst.glob("*.safetensors"):
        p.unlink()
    for p in (dst / "samples").glob("step_*"):
        if int(p.name.split("_")[1]) > checkpoint_step:
            shutil.rmtree(p)


def resume(ctx, source: Path) -> dict:
    """Resume check-B (N processes) from its last checkpoint with each count of ctx.resume_to."""
    validations, checkpoints = check_schedule(ctx)
    result = {"from": source.name, "saved_by_processes": ctx.check_n, "checkpoint": checkpoints[-1], "runs": []}
    for n in ctx.resume_to:
        out = ctx.runs / f"resume-n{n}"
        crash_after_checkpoint(source, out, checkpoints[-1])
        # without --overwrite: it would clear the checkpoints the resume reads
        argv = [a for a in check_argv(ctx, out, [SHARE]) if a != "--overwrite"]
        run = launch(n, [*argv, "--resume_from_checkpoint", "latest"], out)
        row = {"processes": n}
        if run["rc"]:
            result["runs"].append({**row, "error": _tail(run)})
            continue
        checks = written_once(out, ctx.check_steps, validations, checkpoints, 1, ctx.check_n)
        resumed = f"at step {checkpoints[-1]}" in run["log"] and "resumed from" in run["log"]
        row.update({"resumed_at_checkpoint": resumed, "reached_final_step": checks["completed"],
                    "written_once": all_written_once(checks), "checks": checks, **_facts(run)})
        if n == ctx.check_n:  # the same processes, the same data order: the uninterrupted run's LoRA
            row["vs_uninterrupted"] = lora_diff(source / LORA_FILE, out / LORA_FILE)
        result["runs"].append(row)
        ctx.save()
    return result


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
