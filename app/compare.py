"""Runs side by side: which runs to open on, validation-image grids with the base model, loss series,
"generate now". (The settings table is compare_table.py; the downloads, downloads.py.)"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

from .runs import Run, group_runs


def _viewable(image, low: int = 160, high: int = 512):
    """Tiny images enlarged (pixel-exact) so the labels fit; large ones shrunk so a grid stays light."""
    from PIL import Image

    if image is None:
        return None
    side = max(image.width, image.height)
    if side < low:
        f = -(-low // side)
        return image.resize((image.width * f, image.height * f), Image.Resampling.NEAREST)
    if side > high:
        image = image.copy()
        image.thumbnail((high, high), Image.Resampling.LANCZOS)
    return image


def run_label(run: Run) -> str:
    sigma = run.config().get("flat_sigma")
    kind = "LoRA" if sigma in (0, 0.0) else f"Flat-LoRA sigma={sigma}" if sigma is not None else "?"
    return f"{run.name} ({kind})"


def default_selection(runs: list[Run]) -> tuple[list[str], str]:
    """(names, note): what the Compare tab opens on. The newest A/B pair in which every run has validation
    images (a pair cancelled before its first images has nothing to compare), else the two newest runs with
    images; none when no run has any, and then the one line that says so. `runs` newest first."""
    with_images = {r.name for r in runs if r.sample_steps()}
    groups_seen = set()
    for run in runs:
        if not run.ab_group or run.ab_group in groups_seen:
            continue
        groups_seen.add(run.ab_group)
        pair = group_runs(runs, run.name)
        if len(pair) > 1 and all(r.name in with_images for r in pair):
            return [r.name for r in pair], ""
    if with_images:
        return [r.name for r in runs if r.name in with_images][:2], ""
    if not runs:
        return [], "No run yet: launch one in the Train tab."
    return [], ("No run has validation images yet (a run makes them at step 0 when it has a validation "
                "prompt): pick runs to compare their settings and files.")


def all_steps(runs: list[Run]) -> list[int]:
    return sorted({s for r in runs for s in r.sample_steps()})


def step_granularity(steps: list[int]) -> int:
    nonzero = [s for s in steps if s > 0]
    return max(1, reduce(math.gcd, nonzero)) if nonzero else 1


def step_at_or_before(run: Run, step: int | None) -> int | None:
    """The run's newest validation step not after `step` (its newest of all when step is None)."""
    steps = run.sample_steps()
    if not steps:
        return None
    if step is None:
        return steps[-1]
    earlier = [s for s in steps if s <= step]
    return earlier[-1] if earlier else steps[0]


# What a run's step-0 images depend on besides the prompt and seed of their row: runs that agree on these
# share one base-model column (an A/B pair always does), runs that differ get one each.
_BASELINE_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant",
                      "single_file_config", "resolution", "validation_inference_steps", "validation_guidance_scale")


@dataclass
class Baseline:
    """A base-model column: the step-0 validation images of `source` (the trainer validates before the first
    step, when every LoRA init it offers adds exactly zero, so they are the base model's own images), shared
    by `runs`; source None when none of them has step-0 images (a run started from a checkpoint)."""
    runs: list[Run]
    source: Run | None

    def samples(self) -> dict[tuple[int, int], Path]:
        return self.source.samples_at(0) if self.source else {}

    def label(self, several: bool) -> str:
        if self.source is None:
            return "base model\nno step-0 images"
        model = Path(str(self.source.config().get("pretrained_model_name_or_path") or "?")).name
        return f"base model\n{model} · step 0" + (f"\nas in {self.runs[0].name}" if several else "")


def baselines(runs: list[Run]) -> list[Baseline]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        cfg = run.config()
        key = repr([cfg.get(k) for k in _BASELINE_SETTINGS] + [sorted(run.prompts().items())])
        groups.setdefault(key, []).append(run)
    return [Baseline(members, next((r for r in members if 0 in r.sample_steps()), None))
            for members in groups.values()]


def baseline_note(found: list[Baseline]) -> str:
    """One line under the slider about the base-model column(s)."""
    missing = [r.name for b in found if b.source is None for r in b.runs]
    if not missing:
        return "Base model: the runs' step-0 images (before the first training step, the LoRA adds zero)."
    return (f"No step-0 images for {', '.join(missing)}, so its base-model column is empty: Generate now, with "
            f"'include the base model', draws the base model's image of a prompt and seed.")


def _open(path: Path | None):
    from PIL import Image

    try:
        return Image.open(path).convert("RGB") if path else None
    except OSError:
        return None


def validation_grid(runs: list[Run], step: int | None):
    """(grid image or None, [used step per run], [Baseline]): the base-model column(s), then one column per run;
    one row per (prompt, seed)."""
    from flatlora_diffusion.sample import comparison_grid

    used = [step_at_or_before(r, step) for r in runs]
    per_run = [r.samples_at(s) if s is not None else {} for r, s in zip(runs, used)]
    found = baselines(runs)
    base_samples = [b.samples() for b in found]
    keys = sorted({k for samples in per_run + base_samples for k in samples})
    if not keys:
        return None, used, found
    prompts: dict[int, str] = {}
    for r in runs:
        for p, text in r.prompts().items():
            prompts.setdefault(p, text)
    columns = [(b.label(len(found) > 1), [_viewable(_open(samples.get(k))) for k in keys])
               for b, samples in zip(found, base_samples)]
    for run, s, samples in zip(runs, used, per_run):
        columns.append((f"{run_label(run)}\nstep {s}", [_viewable(_open(samples.get(k))) for k in keys]))
    labels = [f"{prompts.get(p, f'prompt {p}')} · seed {seed}" for p, seed in keys]
    return comparison_grid(columns, row_labels=labels), used, found


def loss_series(runs: list[Run], max_points: int = 2000) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(step, loss), ...]) per run, thinned to at most max_points points each."""
    out = []
    for run in runs:
        metrics = [m for m in run.metrics() if isinstance(m.get("loss"), (int, float))]
        stride = max(1, -(-len(metrics) // max_points))
        out.append((run_label(run), [(int(m["step"]), float(m["loss"])) for m in metrics[::stride]]))
    return out


class Generator:
    """'Generate now': each selected run's LoRA on its base model, same prompt and seed, side by side.

    Base pipelines are cached (the last two), and one generation runs at a time.
    """

    def __init__(self, device: str | None = None, cache_size: int = 2):
        self.device = device
        self.cache_size = cache_size
        self._pipes: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def _device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _pipeline(self, cfg: dict):
        from flatlora_diffusion.console import quiet_libraries
        from flatlora_diffusion.sample import load_pipeline

        key = (cfg.get("pretrained_model_name_or_path"), cfg.get("pretrained_vae_model_name_or_path"),
               cfg.get("revision"), cfg.get("variant"), cfg.get("single_file_config"))
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        quiet_libraries()
        pipe = load_pipeline(key[0], device=self._device(), vae=key[1], revision=key[2], variant=key[3],
                             config=key[4])
        self._pipes[key] = pipe
        while len(self._pipes) > self.cache_size:
            self._pipes.popitem(last=False)
        return pipe

    def generate(self, runs: list[Run], prompt: str, seed: int, strength: float = 1.0, steps: int = 20,
                 guidance_scale: float = 7.0, negative_prompt: str | None = None, include_base: bool = True):
        """The grid image: [base model,] then one column per run with a LoRA file."""
        from flatlora_diffusion.sample import SampleError, comparison_grid, generate

        if not prompt or not prompt.strip():
            raise SampleError("type a prompt")
        columns = []
        with self._lock:
            base_done = set()
            for run in runs:
                cfg = run.config()
                files = run.exports()
                lora = files["diffusers"] or files["kohya"]
                if lora is None:
                    raise SampleError(f"{run.name} has no LoRA file yet (state: {run.state})")
                if not cfg.get("pretrained_model_name_or_path"):
                    raise SampleError(f"{run.name}: its config.yaml names no base model")
                pipe = self._pipeline(cfg)
                size = cfg.get("resolution") or None
                kw = dict(steps=int(steps), guidance_scale=float(guidance_scale), height=size, width=size,
                          negative_prompt=negative_prompt or None)
                base_key = (cfg.get("pretrained_model_name_or_path"), size)
                if include_base and base_key not in base_done:
                    base_done.add(base_key)
                    image = generate(pipe, [prompt], [int(seed)], **kw)[0]
                    columns.append((f"base model\n{Path(str(base_key[0])).name}", [_viewable(image)]))
                image = generate(pipe, [prompt], [int(seed)], lora_path=lora, lora_scale=float(strength), **kw)[0]
                columns.append((f"{run_label(run)}\nstrength {strength:g}", [_viewable(image)]))
        return comparison_grid(columns, row_labels=[f"{prompt} · seed {int(seed)}"])
