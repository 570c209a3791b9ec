"""The honest study: what does Flat-LoRA change on the toy-world DreamBooth task? (issue 15)

    OMP_NUM_THREADS=1 python benchmarks/flat_study.py [--workdir DIR] [--seeds 5] [--report-only]

Task (the one the demo uses): 5 instance renders of the "sks toy" subject on the plain background, prompt
"a photo of sks toy", prior preservation with 20 class renders ("a photo of a toy"), 64 px, batch 1,
100 steps, lr 5e-3 constant (text encoder 2e-3; the committed results were made at 5e-3 for both, before
session 13), no warm-up, rank 4, text-encoder LoRA, random flips. Flat-LoRA with the
trainer's default sigma schedule (cosine).

Arms (every arm trained with the same training seeds 0..N-1, so each Flat run has a LoRA twin with the same
data order, timesteps and diffusion noise; differences are paired by seed):
    lora               plain LoRA (sigma 0)                 reference of the flat_* arms
    flat_0.05/0.1/0.2  Flat-LoRA at sigma 0.05, 0.1, 0.2
    dora               DoRA (sigma 0)                       reference of dora_flat_0.1
    dora_flat_0.1      DoRA + Flat-LoRA at sigma 0.1

Every run is evaluated by `flatlora-diffusion evaluate` with its defaults (same evaluation seed, triples, noise
draws and picture seeds for every run): denoising loss on the instance images and on 8 held-out subject
renders, the generalization gap, the sharpness curve on the held-out set, and every toy-world image score.

Declared before running (primary / secondary):
    PRIMARY comparison  flat_0.1 - lora (the paper's sigma), paired by training seed.
    PRIMARY scores      subject_new: the judge sees the subject in scenes the instance images never show (the
                        distribution-shift split: what "flat minima generalize better" predicts should improve);
                        gap: held-out - instance denoising loss (the generalization gap, same distribution).
    MECHANISM check     sharpness at rho = 0.05 and 0.1 (Flat-LoRA should lower it; a flat-minimum claim
                        without it would be unfounded).
    SECONDARY           every other score and every other arm (sigma 0.05 / 0.2, the DoRA pairing).
    Each interval is a 95 % t-interval over training seeds (t(4) = 2.776 for 5 seeds); no correction for the
    many secondary comparisons, so a lone secondary "significant" difference is weak evidence.

Writes benchmarks/results/flat_study.json (every run's scores, per-arm mean and CI, paired differences),
flat_study.md (tables) and flat_study.png (sharpness curves, and the paired differences of the primary scores).
Runs and evaluations already in --workdir are reused, so an interrupted study continues where it stopped.

Runtime: 55.8 min for the committed results, on the 2-core machine while other jobs shared it (load average
4-6): 30 trainings in about 16 min, 30 evaluations in about 40 min. Alone on one core expect about half:
~15 s per training and ~40-50 s per evaluation (its 56 generated pictures dominate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

ARMS = {  # name -> (flat_sigma, use_dora, reference arm or None)
    "lora": (0.0, False, None),
    "flat_0.05": (0.05, False, "lora"),
    "flat_0.1": (0.1, False, "lora"),
    "flat_0.2": (0.2, False, "lora"),
    "dora": (0.0, True, None),
    "dora_flat_0.1": (0.1, True, "dora"),
}
PRIMARY_ARM, PRIMARY_SCORES = "flat_0.1", ("subject_new", "gap")
MECHANISM_SCORES = ("sharp@0.05", "sharp@0.1")
# two-sided 95 % Student t quantiles by degrees of freedom (no scipy in the project)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    return T95.get(df) or T95[max(k for k in T95 if k <= df)]  # a conservative value between table rows


def task_settings(workdir: Path, out: Path, seed: int, sigma: float, use_dora: bool) -> dict:
    """The toy world's DreamBooth task (toyworld/recipe.py, the demo's settings), with DoRA on top where asked."""
    from flatlora_diffusion.toyworld.recipe import dreambooth_settings

    return {**dreambooth_settings(out, workdir / "subject", workdir / "class", flat_sigma=sigma, seed=seed),
            "use_dora": use_dora}


def _completed(run: Path) -> bool:
    try:
        status = json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return status.get("state") == "completed" and (run / "pytorch_lora_weights.safetensors").is_file()


def train_all(workdir: Path, seeds: list[int]) -> dict[str, list[Path]]:
    from accelerate.state import AcceleratorState

    from flatlora_diffusion.config import make_config
    from flatlora_diffusion.toyworld.recipe import write_task_data
    from flatlora_diffusion.train import train

    write_task_data(workdir)
    runs: dict[str, list[Path]] = {}
    for seed in seeds:  # seed-major: an interrupted study still has complete pairs
        for arm, (sigma, dora, _) in ARMS.items():
            out = workdir / "runs" / f"{arm}_s{seed}"
            runs.setdefault(arm, []).append(out)
            if _completed(out):
                continue
            if out.exists():  # a half-written run from an interrupted study: train it again from scratch
                import shutil

                shutil.rmtree(out)
            started = time.time()
            try:
                train(make_config(task_settings(workdir, out, seed, sigma, dora)))
            finally:
                AcceleratorState._reset_state(reset_partial_state=True)
            print(f"trained {out.name} in {time.time() - started:.1f} s", flush=True)
    return runs


def evaluate_all(runs: dict[str, list[Path]]) -> None:
    """One `evaluate` call per arm (the base model, its class pictures and the loss triples are made once per
    call; every call uses the same seeds, so all numbers are comparable across calls)."""
    from flatlora_diffusion.evaluation.evaluate import EvalOptions, evaluate

    for arm, paths in runs.items():
        todo = [p for p in paths if not (p / "eval.json").is_file()]
        if todo:
            started = time.time()
            evaluate([str(p) for p in todo], EvalOptions())
            print(f"evaluated {arm} ({len(todo)} runs) in {time.time() - started:.1f} s", flush=True)


# --- numbers --------------------------------------------------------------------------------------------------
def scores_of(record: dict) -> dict[str, float]:
    """The flat list of numbers one run contributes: losses, sharpness per rho, every image score."""
    out = {"loss_instance": record["loss"]["instance"], "loss_heldout": record["loss"]["heldout"],
           "gap": record["loss"]["gap"]}
    for p in record["sharpness"]["points"]:
        out[f"sharp@{p['rho']:g}"] = p["mean_increase"]
    out[f"worst@{record['sharpness']['points'][-1]['rho']:g}"] = record["sharpness"]["points"][-1]["worst_increase"]
    out.update(record["image_scores"])
    return out


def interval(values: list[float]) -> dict:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "sd": None, "n": n}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def summarize(per_run: dict[str, dict[int, dict[str, float]]]) -> dict:
    keys = list(next(iter(next(iter(per_run.values())).values())))
    arms = {arm: {k: interval([per_run[arm][s][k] for s in sorted(per_run[arm])]) for k in keys} for arm in per_run}
    diffs = {}
    for arm, (_, _, ref) in ARMS.items():
        if ref is None or arm not in per_run or ref not in per_run:
            continue
        seeds = sorted(set(per_run[arm]) & set(per_run[ref]))
        diffs[f"{arm} - {ref}"] = {k: {**interval([per_run[arm][s][k] - per_run[ref][s][k] for s in seeds]),
                                       "seeds": seeds} for k in keys}
    return {"scores": keys, "arms": arms, "differences": diffs}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.4f}"


def _ci(c: dict) -> str:
    if c["low"] is None:
        return _fmt(c["mean"])
    return f"{_fmt(c['mean'])} [{_fmt(c['low'])}, {_fmt(c['high'])}]"


def _excludes_zero(c: dict) -> bool:
    return c["low"] is not None and (c["low"] > 0 or c["high"] < 0)


def markdown(summary: dict, meta: dict) -> str:
    keys, arms, diffs = summary["scores"], summary["arms"], summary["differences"]
    lines = ["# Flat-LoRA study on the toy-world DreamBooth task",
             "",
             f"{meta['seeds']} training seeds per arm, paired by seed; 95 % t-intervals over seeds "
             f"(t({meta['seeds'] - 1}) = {t95(meta['seeds'] - 1)}). Generated by `benchmarks/flat_study.py` "
             f"in {meta['minutes']:.1f} min on {meta['machine']}. Primary (declared before running): "
             f"`{PRIMARY_ARM} - lora` on {', '.join('`' + s + '`' for s in PRIMARY_SCORES)}; mechanism check "
             f"{', '.join('`' + s + '`' for s in MECHANISM_SCORES)}. `*`: the interval excludes 0. Toy world "
             f"(sha256 prefixes): " + ", ".join(f"{k} {v}" for k, v in meta.get("toyworld_sha256", {}).items()) + ".",
             "",
             "## Paired differences (arm - reference), mean [95 % CI]",
             "",
             "| score | " + " | ".join(diffs) + " |",
             "|---|" + "---|" * len(diffs)]
    for k in keys:
        mark = " (primary)" if k in PRIMARY_SCORES else " (mechanism)" if k in MECHANISM_SCORES else ""
        cells = [_ci(d[k]) + (" *" if _excludes_zero(d[k]) else "") for d in diffs.values()]
        lines.append(f"| {k}{mark} | " + " | ".join(cells) + " |")
    lines += ["", "## Every arm, mean [95 % CI]", "", "| score | " + " | ".join(arms) + " |",
              "|---|" + "---|" * len(arms)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_ci(a[k]) for a in arms.values()) + " |")
    lines += ["", "Scores: `loss_*` denoising loss (instance images / 8 held-out subject renders), `gap` = held-out "
              "- instance; `sharp@rho` mean loss increase under filter-wise noise of relative radius rho on the "
              "held-out set (antithetic pairs, common random numbers), `worst@rho` the largest single one; "
              "`subject`/`scene`/`subject_scene` judge rates on \"a photo of sks toy\" in the instance scene, "
              "`*_new` the same in the four scenes the instance images never show; `class_collapse` class-prompt "
              "pictures judged the subject, `class_toy` judged a toy, `class_colour_tv` total-variation distance "
              "of the class prompt's colour histogram from the base model's (same seeds); `diversity_*` mean "
              "pairwise pixel distance within a prompt. See flatlora_diffusion/evaluation/toyscores.py.", ""]
    return "\n".join(lines)


# --- the plot (PIL: matplotlib is not a dependency) -----------------------------------------------------------
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def plot(summary: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1100, 460), "white")
    d = ImageDraw.Draw(img)
    arms, diffs = summary["arms"], summary["differences"]
    # left: sharpness curves, log-log, mean over seeds with the CI as a bar
    rhos = sorted(float(k.split("@")[1]) for k in summary["scores"] if k.startswith("sharp@"))
    box = (70, 40, 500, 400)
    vals = [arms[a][f"sharp@{r:g}"] for a in arms for r in rhos]
    # a CI reaching below zero cannot be drawn on a log axis: bars are cut at a tenth of the smallest mean
    floor = min((v["mean"] for v in vals if v["mean"] > 0), default=1e-12) / 10
    highs = [max(v["high"] if v["high"] is not None else v["mean"], floor) for v in vals]
    y0, y1 = math.log10(floor), math.log10(max(highs))
    x0, x1 = math.log10(rhos[0]), math.log10(rhos[-1])

    def px(r):
        return box[0] + (math.log10(r) - x0) / ((x1 - x0) or 1) * (box[2] - box[0])

    def py(v):
        return box[3] - (math.log10(max(v, floor)) - y0) / ((y1 - y0) or 1) * (box[3] - box[1])

    d.rectangle(box, outline="#999")
    d.text((box[0], 12), "sharpness: mean loss increase vs rho (log-log), mean and 95% CI over seeds", fill="black")
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        if y0 <= e <= y1:
            d.line((box[0], py(10 ** e), box[2], py(10 ** e)), fill="#eee")
            d.text((8, py(10 ** e) - 6), f"1e{e}", fill="#555")
    for r in rhos:
        d.text((px(r) - 12, box[3] + 6), f"{r:g}", fill="#555")
    d.text(((box[0] + box[2]) // 2 - 10, box[3] + 22), "rho", fill="black")
    for i, arm in enumerate(arms):
        c = COLOURS[i % len(COLOURS)]
        pts = [(px(r) + (i - 2.5) * 2, py(arms[arm][f"sharp@{r:g}"]["mean"])) for r in rhos]
        d.line(pts, fill=c, width=2)
        for r, (x, _) in zip(rhos, pts):
            ci = arms[arm][f"sharp@{r:g}"]
            if ci["low"] is not None:
                d.line((x, py(ci["low"]), x, py(ci["high"])), fill=c, width=1)
        d.line((box[0] + 10, box[1] + 10 + 14 * i, box[0] + 30, box[1] + 10 + 14 * i), fill=c, width=3)
        d.text((box[0] + 36, box[1] + 4 + 14 * i), arm, fill="black")
    # right: paired differences of the primary and mechanism scores, each panel centred on zero
    keys = [*PRIMARY_SCORES, *MECHANISM_SCORES]
    left, top, width, row_h = 560, 40, 390, 90
    d.text((left, 12), "paired difference arm - reference, mean and 95% CI (zero: dashed)", fill="black")
    for j, k in enumerate(keys):
        ty = top + j * row_h
        span = max(max(abs(dd[k]["low"] if dd[k]["low"] is not None else dd[k]["mean"]),
                       abs(dd[k]["high"] if dd[k]["high"] is not None else dd[k]["mean"])) for dd in diffs.values())
        span = span or 1.0
        zx = left + width / 2

        def qx(v):
            return zx + v / span * (width / 2 - 10)

        d.text((left, ty), f"{k}  (±{_fmt(span)})", fill="black")
        for yy in range(int(ty + 14), int(ty + row_h - 6), 6):
            d.line((zx, yy, zx, yy + 3), fill="#888")
        for i, (name, dd) in enumerate(diffs.items()):
            c = COLOURS[(list(arms).index(name.split(" - ")[0])) % len(COLOURS)]
            y = ty + 20 + i * 12
            ci = dd[k]
            if ci["low"] is not None:
                d.line((qx(ci["low"]), y, qx(ci["high"]), y), fill=c, width=2)
            d.ellipse((qx(ci["mean"]) - 3, y - 3, qx(ci["mean"]) + 3, y + 3), fill=c)
            d.text((left + width + 8, y - 6), name, fill=c)
    img.save(path)


def toyworld_identity() -> dict[str, str]:
    """Digests of the toy world's weights the numbers depend on: the world (subject, judge, VAE) is still
    being refined, and results of different worlds must not be compared."""
    import hashlib

    from flatlora_diffusion.toyworld import judge_dir, model_dir

    files = {"judge": judge_dir() / "judge.safetensors",
             "unet": model_dir() / "unet" / "diffusion_pytorch_model.safetensors",
             "vae": model_dir() / "vae" / "diffusion_pytorch_model.safetensors"}
    return {k: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for k, p in files.items() if p.is_file()}


def report(runs: dict[str, list[Path]], meta: dict, out_dir: Path) -> dict:
    per_run: dict[str, dict[int, dict[str, float]]] = {}
    records = {}
    for arm, paths in runs.items():
        for p in paths:
            if not (p / "eval.json").is_file():
                continue
            rec = json.loads((p / "eval.json").read_text())
            per_run.setdefault(arm, {})[int(rec["train_seed"])] = scores_of(rec)
            records[p.name] = {"arm": arm, "seed": rec["train_seed"], "scores": scores_of(rec),
                               "per_scene": (rec.get("toyworld") or {}).get("per_scene"),
                               "class_colours": (rec.get("toyworld") or {}).get("class_colours"),
                               "eval_settings": rec["settings"]}
    summary = summarize(per_run)
    meta = {**meta, "seeds": min(len(v) for v in per_run.values()), "toyworld_sha256": toyworld_identity()}
    result = {"study": "flat_study", "arms": {a: {"flat_sigma": s, "use_dora": dora, "reference": ref}
                                              for a, (s, dora, ref) in ARMS.items()},
              "primary": {"comparison": f"{PRIMARY_ARM} - lora", "scores": list(PRIMARY_SCORES),
                          "mechanism": list(MECHANISM_SCORES)},
              "task": task_settings(Path("WORKDIR"), Path("WORKDIR/runs/ARM_sSEED"), -1, -1.0, False),
              "meta": meta, "summary": summary, "runs": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "flat_study.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "flat_study.md").write_text(markdown(summary, meta))
    plot(summary, out_dir / "flat_study.png")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/flat_study", help="where the runs are trained (reused if present)")
    p.add_argument("--seeds", type=int, default=5, help="training seeds per arm (default 5)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the results from the runs' eval.json")
    p.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        print("error: --seeds must be >= 2 (an interval needs two seeds)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    workdir = Path(args.workdir).expanduser().resolve()
    seeds = list(range(args.seeds))
    started = time.time()
    if args.report_only:
        runs = {arm: [workdir / "runs" / f"{arm}_s{s}" for s in seeds] for arm in ARMS}
    else:
        runs = train_all(workdir, seeds)
        evaluate_all(runs)
    meta = {"minutes": (time.time() - started) / 60, "machine": f"{platform.machine()} CPU, 1 torch thread",
            "command": "OMP_NUM_THREADS=1 python benchmarks/flat_study.py", "torch": torch.__version__}
    if args.report_only:
        previous = RESULTS / "flat_study.json"
        if previous.is_file():
            meta["minutes"] = json.loads(previous.read_text())["meta"]["minutes"]
    result = report(runs, meta, Path(args.results))
    print((Path(args.results) / "flat_study.md").read_text())
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
