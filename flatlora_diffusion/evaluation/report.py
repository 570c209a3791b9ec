"""eval.json records, the paired comparison of runs, and the table printed for people.

eval.json (one per run folder, written atomically; the web app reads it):
    schema           "flatlora-diffusion/eval/1"
    run, name, base_model, arch, flat_sigma, flat_targets, train_seed
    settings         what the numbers depend on: eval_seed, triples, rhos, draws, antithetic, batch_size, device,
                     eval_data_dir, images {instance, heldout}, samples, seeds
    loss             {instance, heldout, gap}: mean denoising loss of W' on each image set (null: no held-out set)
    sharpness        {split, triples_digest, clean_loss, draws, antithetic, seed, layers, points: [{rho,
                     mean_increase, stderr, worst_increase, mean_loss, increases}]}: increases[k] is draw k's loss
                     increase (the mean of its +eps / -eps pair when antithetic), worst_increase the largest
                     single evaluation; equal triples_digest = the very same (image, timestep, noise) triples
    image_scores     {clip_t, clip_i, dino, and for toy-world runs the judge's scores (toyscores.SCORE_NAMES)};
                     {} when none was asked for and the run is not a toy-world run
    toyworld         toy-world runs: {per_scene: {scene: {subject, scene, subject_scene}}, new_scenes,
                     instance_scene, class_colours: {run, base}, seeds, pictures}; null otherwise
    seconds          wall time of this run's evaluation
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..run_dir import write_json_atomic

SCHEMA = "flatlora-diffusion/eval/1"
EVAL_FILE = "eval.json"

# The settings that must agree for draw k of one run to be paired with draw k of another.
_PAIRING_KEYS = ("eval_seed", "triples", "rhos", "draws", "antithetic", "batch_size", "eval_data_dir", "device")


def write_eval_json(run_path: Path, record: dict) -> Path:
    out = Path(run_path) / EVAL_FILE
    write_json_atomic(out, record)
    return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean and standard error of b[k] - a[k] over draws k (common random numbers: the per-draw noise that
    both runs share cancels, which is what makes a small difference visible with few draws)."""
    d = [y - x for x, y in zip(a, b)]
    mean = math.fsum(d) / len(d)
    stderr = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
    return {"mean": mean, "stderr": stderr}


def comparisons(records: list[dict]) -> list[dict]:
    """Every run against the first: the sharpness difference per rho, paired draw by draw when the runs were
    measured on the same triples and draws (otherwise unpaired: the difference of means, no standard error)."""
    if len(records) < 2:
        return []
    ref = records[0]
    out = []
    for rec in records[1:]:
        paired = (all(rec["settings"][k] == ref["settings"][k] for k in _PAIRING_KEYS)
                  and rec["sharpness"]["triples_digest"] == ref["sharpness"]["triples_digest"])
        per_rho = []
        for pa, pb in zip(ref["sharpness"]["points"], rec["sharpness"]["points"]):
            if paired:
                diff = paired_difference(pa["increases"], pb["increases"])
            else:
                diff = {"mean": pb["mean_increase"] - pa["mean_increase"], "stderr": None}
            per_rho.append({"rho": pb["rho"], **diff})
        out.append({"run": rec["name"], "reference": ref["name"], "paired": paired,
                    "loss_instance_difference": rec["loss"]["instance"] - ref["loss"]["instance"],
                    "sharpness_difference": per_rho})
    return out


def combined(records: list[dict]) -> dict:
    return {"schema": SCHEMA, "runs": records, "comparisons": comparisons(records)}


def write_combined(path: Path, records: list[dict]) -> None:
    write_json_atomic(Path(path), combined(records))


# --- the table ---------------------------------------------------------------------------------------------
def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _pm(mean, stderr) -> str:
    return _num(mean) + ("" if stderr is None else f"±{stderr:.1e}")


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def format_table(records: list[dict]) -> str:
    """One row per run: sigma, losses, the sharpness curve (mean loss increase ± standard error per rho), image
    scores; then, with several runs, each run's paired sharpness difference to the first."""
    rhos = [p["rho"] for p in records[0]["sharpness"]["points"]]
    score_keys = sorted({k for r in records for k in r["image_scores"]})
    header = ["run", "sigma", "instance", "held-out", "gap"] + [f"Δ@ρ={r:g}" for r in rhos] + score_keys
    rows = [header]
    for rec in records:
        by_rho = {p["rho"]: p for p in rec["sharpness"]["points"]}
        sigma = rec.get("flat_sigma") if rec.get("flat_targets", ["unet"]) else 0.0  # no targets: plain LoRA
        rows.append([rec["name"], "-" if sigma is None else f"{sigma:g}", _num(rec["loss"]["instance"]),
                     _num(rec["loss"]["heldout"]), _num(rec["loss"]["gap"])]
                    + [_pm(by_rho[r]["mean_increase"], by_rho[r]["stderr"]) if r in by_rho else "-" for r in rhos]
                    + [_num(rec["image_scores"].get(k)) for k in score_keys])
    split = records[0]["sharpness"]["split"]
    settings = records[0]["settings"]
    draws = f"{settings['draws']} antithetic draw pairs" if settings.get("antithetic") else f"{settings['draws']} draws"
    lines = [f"loss: denoising loss on the instance / held-out images; Δ@ρ: mean loss increase ± standard error "
             f"under filter-wise noise of radius ρ, on the {split.replace('heldout', 'held-out')} set "
             f"({settings['triples']} triples, {draws})",
             _render(rows)]
    for comp in comparisons(records):
        kind = "paired by draw" if comp["paired"] else "unpaired (different settings)"
        diffs = ", ".join(f"ρ={d['rho']:g}: {_pm(d['mean'], d['stderr'])}" for d in comp["sharpness_difference"])
        lines.append(f"{comp['run']} − {comp['reference']} ({kind}): {diffs}")
    return "\n".join(lines)


def dumps(record: dict) -> str:
    return json.dumps(record, indent=1)
