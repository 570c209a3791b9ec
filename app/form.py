"""The training form, generated from TrainConfig: one widget per field, its help as the widget's info.

This module knows nothing of Gradio: it describes each field (which widget, which group, prominent or
not) and converts between TrainConfig values and widget values, so that the form, the presets and the
tests share one set of rules. tab_train.py turns the descriptions into components.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flatlora_diffusion.config import ConfigError, TrainConfig, field_label, field_type, load_yaml

DEFAULT_CHOICE = "(default)"  # the dropdown entry that stands for None in an optional choice field

# Fields the app sets itself or that would write outside the runs folder.
APP_MANAGED = {
    "output_dir": "the app puts each run in its own folder under the runs folder",
    "logging_dir": "inside the run folder",
    "cache_dir": "the hub cache is the user's business, not the form's",
    "resume_from_checkpoint": "resume a run from the Runs tab",
    "local_rank": "set by launchers",
    "overwrite": "every run gets a folder of its own",
}

# The settings most runs change, shown at the top in this order; the rest go into accordions by group.
PROMINENT = [
    "pretrained_model_name_or_path",
    "instance_data_dir",
    "instance_prompt",
    "resolution",
    "max_train_steps",
    "learning_rate",
    "rank",
    "train_batch_size",
    "flat_sigma",
    "flat_schedule",
    "train_text_encoder",
    "with_prior_preservation",
    "class_prompt",
    "class_data_dir",
    "num_class_images",
    "validation_prompt",
    "validation_seeds",
    "validation_steps",
    "seed",
]

GROUP_TITLES = {
    "model": "Model",
    "data": "Data",
    "prior": "Prior preservation",
    "lora": "LoRA",
    "flat": "Flat-LoRA",
    "optim": "Optimizer and learning rate",
    "steps": "Steps and batches",
    "speed": "Speed and memory",
    "state": "Checkpoints",
    "validation": "Validation images",
    "output": "Output",
}

# Lists typed one item per line (prompts contain commas); other lists are comma-separated.
LINE_LISTS = {"validation_prompt"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # checkbox | dropdown | checkboxgroup | number | text | lines
    elem: type
    is_list: bool
    optional: bool
    default: Any
    choices: tuple[str, ...] | None
    help: str
    group: str
    prominent: bool
    label: str  # config.py's label: "Learning rate", not learning_rate
    initial: Any  # the form's starting value: config.py's form_default where it has one, else `default`
    note: str  # what an empty box means in the form (config.py's form_note)

    @property
    def info(self) -> str:
        """The help under the widget; it ends with the flag / YAML key, so the CLI and presets can be matched."""
        extra = ""
        if self.kind == "lines":
            extra = " One per line."
        elif self.is_list and self.kind == "text":
            extra = " Comma-separated."
        if self.note:
            extra += " " + self.note
        elif self.optional and self.kind == "text" and self.elem in (int, float):
            extra += " Empty = default."
        return f"{self.help}{extra} (--{self.name})"

    def widget_default(self):
        return to_widget(self, self.initial)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _spec(f: dataclasses.Field) -> FieldSpec:
    elem, is_list = field_type(f.name)
    default = _default(f)
    choices = tuple(f.metadata.get("choices") or ()) or None
    initial = f.metadata["form_default"] if "form_default" in f.metadata else default
    optional = default is None or initial is None  # an empty box is a value: a text box, not a number box
    if elem is bool:
        kind = "checkbox"
    elif choices and is_list:
        kind = "checkboxgroup"
    elif choices:
        kind = "dropdown"
    elif is_list:
        kind = "lines" if f.name in LINE_LISTS else "text"
    elif elem in (int, float) and not optional:
        kind = "number"
    else:
        kind = "text"  # strings, and numbers that may be left empty
    meta = f.metadata
    return FieldSpec(
        name=f.name, kind=kind, elem=elem, is_list=is_list, optional=optional, default=default,
        choices=choices, help=meta.get("help", ""), group=meta.get("group", "output"),
        prominent=f.name in PROMINENT, label=field_label(f.name),
        initial=initial, note=meta.get("form_note", ""),
    )


def form_fields() -> list[FieldSpec]:
    """Every field the form shows: prominent ones first (in PROMINENT's order), then the rest by group."""
    specs = [
        _spec(f) for f in dataclasses.fields(TrainConfig)
        if f.name not in APP_MANAGED and not f.metadata.get("secret") and not f.metadata.get("hidden")
    ]
    order = {name: i for i, name in enumerate(PROMINENT)}
    groups = list(GROUP_TITLES)
    return sorted(specs, key=lambda s: (0, order[s.name]) if s.prominent else (1, groups.index(s.group)))


def spec_by_name() -> dict[str, FieldSpec]:
    return {s.name: s for s in form_fields()}


# --- value conversion ----------------------------------------------------------------------------------
def _number_text(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def to_widget(spec: FieldSpec, value):
    """A TrainConfig value as its widget shows it."""
    if spec.kind == "checkbox":
        return bool(value)
    if spec.kind == "dropdown":
        return DEFAULT_CHOICE if value is None else str(value)
    if spec.kind == "checkboxgroup":
        return list(value or [])
    if spec.kind == "number":
        return value
    if spec.is_list:
        sep = "\n" if spec.kind == "lines" else ", "
        return sep.join(str(v) for v in (value or []))
    return "" if value is None else _number_text(value) if spec.elem in (int, float) else str(value)


def from_widget(spec: FieldSpec, raw):
    """A widget value as a TrainConfig value (types are checked again by make_config)."""
    if spec.kind == "checkbox":
        return bool(raw)
    if spec.kind == "dropdown":
        return None if raw in (None, "", DEFAULT_CHOICE) else raw
    if spec.kind == "checkboxgroup":
        return list(raw or [])
    if spec.kind == "number":
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return spec.default
        if isinstance(raw, float) and math.isnan(raw):
            raise ConfigError(f"{spec.name} must be a number")
        if spec.elem is int and isinstance(raw, float):
            if not raw.is_integer():
                raise ConfigError(f"{spec.name} must be a whole number, got {raw}")
            return int(raw)
        return raw
    if spec.is_list:
        text = "" if raw is None else str(raw)
        parts = text.splitlines() if spec.kind == "lines" else text.replace("\n", ",").split(",")
        return [p.strip() for p in parts if p.strip()]
    text = "" if raw is None else str(raw).strip()
    if not text:
        return None if spec.optional else ""
    if spec.elem in (int, float):
        return _parse_number(spec, text)
    return text


def _parse_number(spec: FieldSpec, text: str):
    """A number typed into a text box (an optional number: empty means something); one-line errors."""
    if spec.elem is int and text.lstrip("+-").isdigit():
        return int(text)  # exact, however large (a float would round seeds beyond 2**53)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{spec.label} (--{spec.name}) must be a number, got {text!r}") from None
    if spec.elem is int:
        if not value.is_integer():
            raise ConfigError(f"{spec.label} (--{spec.name}) must be a whole number, got {text!r}")
        return int(value)
    return value


def values_from_widgets(widgets: dict[str, Any]) -> dict[str, Any]:
    """{field: widget value} -> {field: TrainConfig value}, for every form field given."""
    specs = spec_by_name()
    out = {}
    for name, raw in widgets.items():
        if name not in specs:
            raise ConfigError(f"unknown setting {name!r}")
        out[name] = from_widget(specs[name], raw)
    return out


def widgets_from_values(values: dict[str, Any]) -> dict[str, Any]:
    """{field: TrainConfig value} (e.g. a preset) -> widget values for every form field; missing = the form's
    starting value (as a preset is saved relative to it)."""
    return {s.name: to_widget(s, values.get(s.name, s.initial)) for s in form_fields()}


# --- presets --------------------------------------------------------------------------------------------
def non_default(values: dict[str, Any]) -> dict[str, Any]:
    """Only the settings that differ from the form's starting values: presets stay short and readable."""
    specs = spec_by_name()
    return {k: v for k, v in values.items() if k in specs and v != specs[k].initial}


def preset_yaml(values: dict[str, Any]) -> str:
    return yaml.safe_dump(non_default(values), sort_keys=False, allow_unicode=True)


def load_preset(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """A YAML preset (or any run's config.yaml) -> (form values, ignored keys). Raises ConfigError."""
    data = load_yaml(path)
    specs = spec_by_name()
    ignored = sorted(k for k in data if k not in specs)
    return {k: v for k, v in data.items() if k in specs}, ignored
