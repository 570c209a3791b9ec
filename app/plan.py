"""The run plan: what a filled-in form will do, worked out before Launch, with the rules that fill its gaps.

The web form's empty boxes mean what a newcomer expects (a run that trains and shows validation images),
not diffusers' command-line defaults, and this module is where those rules live, for both the plan shown
on the page and the config.yaml that prepare_runs writes:

- Training steps empty: Epochs x steps per epoch when Epochs > 1, else config.py's form_default (500).
  diffusers' rule (empty = one epoch) makes 2 steps of 5 images at batch 4.
- Validation prompts empty: the instance prompt.
- Validate every N steps and every N epochs both empty: every quarter of the run.

Steps per epoch follow the trainer (trainer/setup.py): the dataset is the images x their kohya repeats x Repeats
(with prior preservation, at least the class images), in batches of Batch size, Gradient accumulation
batches per step. Seconds per step come from earlier runs' metrics.jsonl with the same model, resolution and
batch. Pure Python: no Gradio, no training code.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlora_diffusion.config import TrainConfig

from .runs import list_runs

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}  # data.IMAGE_EXTENSIONS
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")  # "10_sks dog": these images 10 times per epoch (data/records.py)
VALIDATIONS_PER_RUN = 4  # besides step 0: a quarter of the run apart
FEW_STEPS = 50  # below this a LoRA barely moves away from the base model
_SPEED_KEYS = ("pretrained_model_name_or_path", "resolution", "train_batch_size", "gradient_accumulation_steps",
               "train_text_encoder", "with_prior_preservation", "aspect_ratio_buckets")


def default_steps() -> int:
    """The form's training steps when the box is empty (config.py's form_default, one place)."""
    return int(TrainConfig.__dataclass_fields__["max_train_steps"].metadata["form_default"])


# --- counting images ------------------------------------------------------------------------------------
_COUNT_CACHE: dict[str, tuple[tuple, int]] = {}


def _folder_stamp(root: Path) -> tuple:
    """Changes when images are added to or removed from the folder or its subfolders (mtimes of folders)."""
    stamps = []
    for p in [root, *(q for q in root.iterdir() if q.is_dir())]:
        stamps.append((p.name, p.stat().st_mtime_ns))
    return tuple(stamps)


def count_folder_images(text: str | None) -> int | None:
    """Training images in a typed folder, each counted as often as its kohya folder repeats it; None when the
    folder cannot be read. Cached per folder state: the plan is redrawn on every keystroke."""
    if not text or not str(text).strip():
        return None
    root = Path(str(text).strip()).expanduser()
    try:
        if not root.is_absolute() or not root.is_dir():
            return None
        stamp = _folder_stamp(root)
        cached = _COUNT_CACHE.get(str(root))
        if cached and cached[0] == stamp:
            return cached[1]
        total = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        for sub in root.iterdir():
            m = _KOHYA_FOLDER.match(sub.name)
            if sub.is_dir() and m and int(m.group(1)) >= 1:
                n = sum(1 for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
                total += n * int(m.group(1))
    except OSError:
        return None
    _COUNT_CACHE[str(root)] = (stamp, total)
    return total


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


# --- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    images: int | None  # training images per epoch before Repeats (None: unknown, e.g. a dataset)
    repeats: int
    batch: int  # images per optimizer step (batch size x accumulation)
    steps_per_epoch: int | None
    total_steps: int | None
    steps_rule: str  # why total_steps is what it is, in words
    epochs: int | None
    validation_at: list[int]
    validation_prompts: list[str]
    images_per_validation: int
    runs: int  # 2 for A/B
    seconds_per_step: float | None = None
    speed_from: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def estimated_seconds(self) -> float | None:
        if not self.seconds_per_step or not self.total_steps:
            return None
        return self.seconds_per_step * self.total_steps * self.runs


def _steps_per_epoch(values: dict[str, Any], images: int | None) -> int | None:
    if not images:
        return None
    examples = images * int(values.get("repeats") or 1)
    if values.get("with_prior_preservation"):
        examples = max(examples, int(values.get("num_class_images") or 0))  # as diffusers' dataset length
    batches = math.ceil(examples / int(values.get("train_batch_size") or 1))
    return math.ceil(batches / int(values.get("gradient_accumulation_steps") or 1))


def _total_steps(values: dict[str, Any], per_epoch: int | None) -> tuple[int | None, str]:
    """(steps, why); steps None when epochs decide but the images are uncounted (a dataset): the trainer
    counts them."""
    if values.get("max_train_steps"):
        return int(values["max_train_steps"]), "Training steps"
    epochs = int(values.get("num_train_epochs") or 1)
    if epochs > 1:
        return (epochs * per_epoch if per_epoch else None), f"{epochs} epochs (Training steps empty)"
    return default_steps(), "the form's default (Training steps empty)"


def _validation_every(values: dict[str, Any], total: int | None) -> int | None:
    if values.get("validation_steps"):
        return int(values["validation_steps"])
    if values.get("validation_epochs") or total is None:
        return None
    return max(1, math.ceil(total / VALIDATIONS_PER_RUN))


def validation_schedule(total: int, every_steps: int | None, every_epochs: int | None,
                        per_epoch: int | None, at_start: bool = True) -> list[int]:
    """The steps that get validation images, as the trainer makes them: step 0 (unless `at_start` is off), every
    N steps, after every N epochs (when the epoch ends before the run does), and the last step."""
    at = {0, total} if at_start else {total}
    if every_steps:
        at.update(range(every_steps, total + 1, every_steps))
    if every_epochs and per_epoch:
        at.update(s for s in range(every_epochs * per_epoch, total, every_epochs * per_epoch))
    return sorted(at)


def resolve(values: dict[str, Any], images: int | None) -> dict[str, Any]:
    """The form's values with its empty-box rules applied (see the module docstring): what config.yaml gets."""
    out = dict(values)
    per_epoch = _steps_per_epoch(values, images)
    out["max_train_steps"] = _total_steps(values, per_epoch)[0]
    if not out.get("validation_prompt") and values.get("instance_prompt"):
        out["validation_prompt"] = [values["instance_prompt"]]
    every = _validation_every(values, out["max_train_steps"])
    if every is not None:
        out["validation_steps"] = every
    return out


def make_plan(values: dict[str, Any], images: int | None, runs: int = 1, runs_dir: str | os.PathLike | None = None,
              captions_cover_all: bool = False) -> Plan:
    """The plan of a launch from the form's (TrainConfig) values and the number of training images."""
    per_epoch = _steps_per_epoch(values, images)
    total, rule = _total_steps(values, per_epoch)
    resolved = resolve(values, images)
    prompts = list(resolved.get("validation_prompt") or [])
    seeds = values.get("validation_seeds") or []
    plan = Plan(
        images=images, repeats=int(values.get("repeats") or 1),
        batch=int(values.get("train_batch_size") or 1) * int(values.get("gradient_accumulation_steps") or 1),
        steps_per_epoch=per_epoch, total_steps=total, steps_rule=rule,
        epochs=math.ceil(total / per_epoch) if per_epoch and total else None,
        validation_at=validation_schedule(total, resolved.get("validation_steps"), values.get("validation_epochs"),
                                          per_epoch, values.get("validate_at_start", True) is not False)
        if total is not None and prompts else [],
        validation_prompts=prompts, images_per_validation=len(prompts) * (len(seeds) or
                                                                          int(values.get("num_validation_images") or 4)),
        runs=runs,
    )
    if runs_dir is not None:
        plan.seconds_per_step, plan.speed_from = measured_speed(runs_dir, values)
    plan.warnings = _warnings(plan, values, captions_cover_all)
    return plan


def _warnings(plan: Plan, values: dict[str, Any], captions_cover_all: bool) -> list[str]:
    out = []
    if plan.total_steps is not None and plan.total_steps < FEW_STEPS:
        out.append(f"Only {plan.total_steps} training steps: a LoRA barely changes in fewer than {FEW_STEPS}.")
    if not plan.validation_prompts:
        out.append("No validation prompt (and no instance prompt): no validation images will show how the "
                   "training goes.")
    if plan.images == 0:
        out.append("No training images yet: upload some or type the folder that holds them.")
    if plan.images and not values.get("instance_prompt") and not captions_cover_all and not values.get("dataset_name"):
        out.append("No instance prompt: every image needs a caption file.")
    return out


def measured_speed(runs_dir: str | os.PathLike, values: dict[str, Any]) -> tuple[float | None, str | None]:
    """(seconds per step, run name) of the newest run on this machine that trained with the same model,
    resolution and batch (settings the form leaves empty match anything); (None, None) when none has."""
    wanted = {k: values.get(k) for k in _SPEED_KEYS if values.get(k) not in (None, "")}
    defaults = {k: TrainConfig.__dataclass_fields__[k].default for k in _SPEED_KEYS}
    for run in list_runs(runs_dir):
        cfg = run.config()
        if any(cfg.get(k, defaults[k]) != v for k, v in wanted.items()):
            continue
        rates = [m.get("it_per_s") for m in run.metrics()[-1:]]
        if rates and isinstance(rates[0], (int, float)) and rates[0] > 0:
            return 1.0 / rates[0], run.name
    return None, None


# --- in words ---------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _steps_list(steps: list[int], limit: int = 8) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:limit - 2])) + f", … {steps[-1]}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def plan_markdown(plan: Plan) -> str:
    """The plan as the page shows it above Launch."""
    lines = []
    if plan.steps_per_epoch:
        reps = f" × {plan.repeats} repeats" if plan.repeats > 1 else ""
        lines.append(f"**{_n(plan.images, 'image')}**{reps} / batch {plan.batch} → "
                     f"**{_n(plan.steps_per_epoch, 'step')} per epoch**, {_n(plan.epochs, 'epoch')}")
    elif plan.images is None:
        lines.append("Images: not counted yet (upload them or type their folder)")
    steps = f"{plan.total_steps}" if plan.total_steps is not None else "as many"
    lines.append(f"**{steps} training steps** ({plan.steps_rule})"
                 + (", two runs one after the other (A/B)" if plan.runs > 1 else ""))
    if plan.validation_at:
        lines.append(f"Validation images at steps {_steps_list(plan.validation_at)} "
                     f"({plan.images_per_validation} images each time)")
    if plan.estimated_seconds:
        lines.append(f"Estimated time: **about {_duration(plan.estimated_seconds)}** of training "
                     f"({plan.seconds_per_step:.2f} s/step measured in run {plan.speed_from}), plus model loading")
    else:
        lines.append("Estimated time: known after a first run with this model, resolution and batch size")
    lines += [f"⚠️ {w}" for w in plan.warnings]
    return "  \n".join(lines)


__all__ = ["Plan", "make_plan", "plan_markdown", "resolve", "count_folder_images", "measured_speed",
           "validation_schedule", "default_steps"]
