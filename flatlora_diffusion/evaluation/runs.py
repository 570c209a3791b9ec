"""Run folders as evaluation sees them: checked without loading a model, then base model + LoRA loaded.

Everything a user can get wrong (not a run folder, no LoRA file, runs on different base models, a missing
instance folder) is found by `inspect_run` / `check_comparable` before any weights are read, and raised as
EvalInputError with one line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..models import ModelError, ModelSource, inspect_model_source
from ..run_dir import CONFIG_FILE, DIFFUSERS_WEIGHTS

_ADAPTER = "flatlora_eval"


class EvalInputError(ValueError):
    """A mistake in what the user asked to evaluate; one line, printed without a traceback."""


@dataclass
class RunInfo:
    path: Path
    config: dict[str, Any]
    source: ModelSource
    lora_file: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def arch(self) -> str:
        return self.source.arch

    @property
    def base_model(self) -> str:
        return str(self.config["pretrained_model_name_or_path"])

    @property
    def resolution(self) -> int:
        return int(self.config.get("resolution") or (1024 if self.arch == "sdxl" else 512))

    def setting(self, key: str, default=None):
        value = self.config.get(key)
        return default if value is None else value


def inspect_run(path: str | Path) -> RunInfo:
    """The run folder's config, base model (architecture read from its files, no weights) and LoRA file."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise EvalInputError(f"{path} is not a folder (give run folders written by `flatlora-diffusion train`)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise EvalInputError(f"{path} is not a run folder: it has no {CONFIG_FILE}")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{config_file} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or not config.get("pretrained_model_name_or_path"):
        raise EvalInputError(f"{config_file} does not name a base model (pretrained_model_name_or_path)")
    lora_file = path / DIFFUSERS_WEIGHTS
    if not lora_file.is_file():
        raise EvalInputError(f"run {path} has no LoRA file {DIFFUSERS_WEIGHTS} (did training finish?)")
    try:
        source = inspect_model_source(str(config["pretrained_model_name_or_path"]), config.get("revision"),
                                      config.get("cache_dir"))
    except ModelError as e:
        raise EvalInputError(f"run {path.name}: {e}") from None
    return RunInfo(path=path, config=config, source=source, lora_file=lora_file)


def _model_identity(run: RunInfo) -> str:
    """A local path compared resolved (./m and /abs/m are one model); a hub id compared as written."""
    if run.source.kind == "hub":
        return run.base_model + "@" + str(run.config.get("revision") or "main")
    return str(Path(run.source.location).resolve())


def check_comparable(runs: list[RunInfo]) -> None:
    """Runs evaluated together share one loaded base model and the same triples: same model, same architecture."""
    first = runs[0]
    for run in runs[1:]:
        if run.arch != first.arch:
            raise EvalInputError(f"runs have different architectures: {first.name} is {first.arch}, "
                                 f"{run.name} is {run.arch}; evaluate them separately")
        if _model_identity(run) != _model_identity(first):
            raise EvalInputError(f"runs have different base models: {first.name} uses {first.base_model}, "
                                 f"{run.name} uses {run.base_model}; evaluate them separately")
        if run.setting("pretrained_vae_model_name_or_path") != first.setting("pretrained_vae_model_name_or_path"):
            raise EvalInputError(f"runs use different VAEs ({first.name}, {run.name}); evaluate them separately")


def load_base(run: RunInfo, device: str):
    """The base model's components (fp32, eval mode) on `device`, loaded the way training loads them."""
    from ..models import load_components

    c = load_components(run.source, revision=run.config.get("revision"), variant=run.config.get("variant"),
                        cache_dir=run.config.get("cache_dir"),
                        vae_path=run.config.get("pretrained_vae_model_name_or_path"),
                        tokenizer_name=run.config.get("tokenizer_name"),
                        single_file_config=run.config.get("single_file_config"))
    for model in [c.unet, c.vae, *c.text_encoders]:
        model.requires_grad_(False)
        model.to(device)
        model.eval()
    return c


@contextlib.contextmanager
def lora_attached(components, run: RunInfo) -> Iterator[None]:
    """The run's LoRA (UNet and, when trained, text encoders) on the shared base model for the block, then
    unloaded, so one loaded base model serves every run compared."""
    pipe = components.pipeline()
    pipe.load_lora_weights(str(run.path), weight_name=DIFFUSERS_WEIGHTS, adapter_name=_ADAPTER)
    try:
        for model in [components.unet, *components.text_encoders]:
            model.eval()  # LoRA dropout off: the loss must be a function of the weights alone
        yield
    finally:
        pipe.unload_lora_weights()
