"""The Compare tab's settings table: the settings in which the compared runs differ (all of them on request),
then their metrics.

A config.yaml holds every setting, so a table of all of them buries the one or two that make runs differ
(an A/B pair differs in flat_sigma alone). Paths into a run's own folder (output_dir, uploaded images,
generated class images) and an output_name equal to the run's name are that run's own place, not a
setting: they count as equal across runs.
"""

from __future__ import annotations

import os

from .runs import Run

KEY_SETTINGS = ("pretrained_model_name_or_path", "flat_sigma", "flat_schedule", "seed", "rank", "lora_alpha",
                "learning_rate", "max_train_steps", "train_batch_size", "resolution", "train_text_encoder",
                "with_prior_preservation", "lr_scheduler", "optimizer", "mixed_precision")  # listed first
METRICS_SHOWN = ("state", "step", "first_loss", "final_loss", "mean_loss_last_10pct", "it_per_s", "duration_s")
OWN_FOLDER = "<the run's folder>"


def comparable(run: Run, key: str, value):
    """The value as compared across runs: the run's own folder and name replaced by placeholders."""
    folder = str(run.path)
    if isinstance(value, str):
        if key == "output_name" and value == run.name:
            return "<the run's name>"
        if value == folder or value.startswith(folder + os.sep):
            return OWN_FOLDER + value[len(folder):]
    return value


def differing(runs: list[Run], configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({repr(comparable(r, k, c.get(k))) for r, c in zip(runs, configs)}) > 1]


def _ordered(keys) -> list[str]:
    keys = set(keys)
    return [k for k in KEY_SETTINGS if k in keys] + sorted(keys - set(KEY_SETTINGS))


def settings_table(runs: list[Run], show_all: bool = False) -> tuple[list[str], list[list], str]:
    """(headers, rows, note): the settings that differ (every setting with show_all, or for one run), then the
    metrics; the note says which the table holds."""
    configs = [r.config() for r in runs]
    every = _ordered(k for c in configs for k in c)
    differ = differing(runs, configs)
    if show_all or len(runs) < 2:
        keys = every
        note = f"All {len(every)} settings, then the metrics."
    else:
        keys = _ordered(differ)
        said = (f"Only the {len(keys)} of {len(every)} settings that differ between these runs"
                if keys else f"These runs have the same {len(every)} settings")
        note = (f"{said} (paths into each run's own folder count as the same), then the metrics. Tick "
                f"'show all settings' for the rest.")
    summaries = [r.summary() for r in runs]
    rows = [[k] + [_cell(c.get(k)) for c in configs] for k in keys]
    rows += [[k] + [_cell(s.get(k)) for s in summaries] for k in METRICS_SHOWN]
    return ["setting"] + [r.name for r in runs], rows, note


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


__all__ = ["KEY_SETTINGS", "METRICS_SHOWN", "settings_table", "differing", "comparable"]
