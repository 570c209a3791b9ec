"""What the Compare tab shows of evaluations: each run's eval.json as a table row, the sharpness curves, and
the state of an evaluation started from the app.

The app stays a client of the run folder: `flatlora-diffusion evaluate <run>` (started by the launcher) writes
<run>/eval.json; the launcher records the evaluation's own state in <run>/eval_status.json (never in
status.json, which is the training's) and its output in <run>/eval.log. Everything here only reads.
"""

from __future__ import annotations

import json
import math

from flatlora_diffusion.run_dir import write_json_atomic

from .runs import Run

EVAL_FILE = "eval.json"
EVAL_STATUS_FILE = "eval_status.json"
EVAL_LOG_FILE = "eval.log"
NOT_EVALUATED = "not evaluated"
# Columns after the losses and the sharpness, in this order when present (toy-world judge scores, then CLIP/DINO).
IMAGE_SCORE_ORDER = ("subject", "subject_new", "scene_new", "subject_scene_new", "class_collapse",
                     "class_colour_tv", "diversity_subject", "diversity_class", "clip_t", "clip_i", "dino")


def read_eval(run: Run) -> dict | None:
    """The run's eval.json, or None when it is missing or unreadable (a half-written file cannot exist: it is
    written atomically, but a hand-edited one can be broken)."""
    try:
        record = json.loads((run.path / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("loss"), dict) else None


def eval_status(run: Run) -> dict:
    try:
        status = json.loads((run.path / EVAL_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_eval_status(run: Run, **fields) -> dict:
    status = {**eval_status(run), **fields}
    write_json_atomic(run.path / EVAL_STATUS_FILE, status, in_place_fallback=True)
    return status


def _num(x) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return ""
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.4f}"


def _points(record: dict) -> dict[float, dict]:
    return {float(p["rho"]): p for p in (record.get("sharpness") or {}).get("points") or []}


def eval_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per run, its losses, sharpness at each rho and image scores; a run without
    eval.json gets a row that says so (and whether an evaluation is waiting or running)."""
    records = [read_eval(r) for r in runs]
    rhos = sorted({rho for rec in records if rec for rho in _points(rec)})
    found = {k for rec in records if rec for k in (rec.get("image_scores") or {})}
    scores = [k for k in IMAGE_SCORE_ORDER if k in found] + sorted(found - set(IMAGE_SCORE_ORDER))
    headers = (["run", "evaluation", "sigma", "loss instance", "loss held-out", "gap"]
               + [f"Δ@ρ={r:g}" for r in rhos] + scores)
    rows = []
    for run, rec in zip(runs, records):
        if rec is None:
            state = eval_status(run).get("state")
            why = NOT_EVALUATED + (f" ({state})" if state in ("queued", "running", "failed", "cancelled") else "")
            rows.append([run.name, why] + [""] * (len(headers) - 2))
            continue
        loss, points, image = rec["loss"], _points(rec), rec.get("image_scores") or {}
        sigma = rec.get("flat_sigma")
        rows.append([run.name, f"evaluated ({rec.get('sharpness', {}).get('split', '?')} split)",
                     "" if sigma is None else f"{sigma:g}", _num(loss.get("instance")), _num(loss.get("heldout")),
                     _num(loss.get("gap"))]
                    + [_num(points[r]["mean_increase"]) if r in points else "" for r in rhos]
                    + [_num(image.get(k)) for k in scores])
    return headers, rows


def sharpness_series(runs: list[Run]) -> list[tuple[str, list[tuple[float, float, float | None]]]]:
    """(label, [(rho, mean increase, standard error), ...]) for every evaluated run."""
    from .compare import run_label

    out = []
    for run in runs:
        rec = read_eval(run)
        if rec is None:
            continue
        pts = [(float(p["rho"]), float(p["mean_increase"]), p.get("stderr")) for p in _points(rec).values()]
        out.append((run_label(run), sorted(pts)))
    return out


def status_markdown(runs: list[Run], waiting: list[str], running: str | None) -> str:
    """One line per selected run: evaluated when, waiting, running, or failed with its last words."""
    lines = []
    for run in runs:
        st = eval_status(run)
        if running == run.name:
            lines.append(f"**{run.name}**: evaluating now")
        elif run.name in waiting:
            lines.append(f"**{run.name}**: evaluation waiting in the queue ({waiting.index(run.name) + 1}.)")
        elif st.get("state") in ("failed", "cancelled"):
            lines.append(f"**{run.name}**: evaluation {st['state']}: {st.get('message') or ''}".rstrip(": "))
        elif (record := read_eval(run)) is not None:
            seconds = record.get("seconds")
            took = f" ({seconds:.0f} s)" if isinstance(seconds, (int, float)) else ""
            lines.append(f"**{run.name}**: evaluated{took}")
        else:
            lines.append(f"**{run.name}**: {NOT_EVALUATED}")
    return "  \n".join(lines)
