"""`export_lora`: a run directory, a checkpoint folder or a LoRA file -> a kohya or diffusers file; and the
writers the trainer calls for a run's own files (diffusers_file_contents, save_kohya_lora)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..run_dir import CONFIG_FILE as RUN_CONFIG
from ..run_dir import DIFFUSERS_WEIGHTS as RUN_WEIGHTS
from ..safetensors_io import SafetensorsFormatError, file_data_sha256, read_header, save_safetensors_atomic
from . import names
from .arch import arch_from_models, check_arch
from .from_models import lora_from_models
from .lora import ExportError, Lora
from .metadata import STRUCTURAL_KEYS, build_metadata, is_set, metadata_text, sshs_model_hash
from .names import SD2, SD15, SDXL
from .readers import load_lora_file, read_state_dict
from .writers import lora_to_diffusers, lora_to_kohya

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("kohya", "diffusers")


def _flatten_settings(config) -> dict:
    """config.yaml may group settings in sections; flatten one level (top-level keys win)."""
    if not isinstance(config, Mapping):
        return {}
    flat = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    for section in config.values():
        if isinstance(section, Mapping):
            for k, v in section.items():
                flat.setdefault(k, v)
    return flat


def _read_run_settings(run_dir: Path) -> dict:
    settings: dict = {}
    config_file = run_dir / RUN_CONFIG
    if config_file.is_file():
        import yaml

        try:
            settings = _flatten_settings(yaml.safe_load(config_file.read_text(encoding="utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ExportError(f"{config_file} is not valid YAML: {str(e).splitlines()[0]}") from None
    status_file = run_dir / "status.json"
    if status_file.is_file():
        try:
            status = json.loads(status_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            status = {}
        if isinstance(status, Mapping):
            for ours, theirs in (
                ("training_started_at", "started_at"),
                ("training_finished_at", "finished_at"),
                ("global_step", "step"),
            ):
                if is_set(status.get(theirs)):
                    settings.setdefault(ours, status[theirs])
    return settings


def _arch_hint_from_settings(settings: Mapping) -> str | None:
    """The base model's architecture as the run's settings tell it (a local diffusers folder or its name)."""
    explicit = settings.get("arch") or settings.get("model_arch")
    if explicit in names.ARCHS:
        return explicit
    model = settings.get("pretrained_model_name_or_path")
    if not model:
        return None
    folder = Path(str(model))
    index = folder / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (json.JSONDecodeError, OSError):
            cls = ""
        if "XL" in cls:
            return SDXL
        unet_config = folder / "unet" / "config.json"
        try:
            cross = json.loads(unet_config.read_text(encoding="utf-8")).get("cross_attention_dim")
        except (json.JSONDecodeError, OSError):
            cross = None
        return SD2 if cross == 1024 else SD15
    lowered = str(model).lower()
    if "xl" in lowered:
        return SDXL
    if "stable-diffusion-2" in lowered or "sd2" in lowered:
        return SD2
    return None


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a trainer checkpoint folder (checkpoint-N with training_state.json), else None."""
    try:
        step = json.loads((folder / "training_state.json").read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _checkpoint_settings(checkpoint: Path, step: int) -> tuple[dict, Path | None]:
    """The settings of the run a checkpoint belongs to (its config.yaml two levels up, when there), as of
    the checkpoint's step, and that run folder."""
    run_dir = checkpoint.parent.parent
    if not (run_dir / RUN_CONFIG).is_file():
        return {"global_step": step}, None
    settings = _read_run_settings(run_dir)
    settings.pop("training_finished_at", None)  # the run's end is not this file's
    settings["global_step"] = step
    return settings, run_dir


def _default_output(input_path: Path, weights: Path, fmt: str, settings: Mapping, is_run: bool,
                    step: int | None = None, run_dir: Path | None = None) -> Path:
    suffix = ".safetensors" if fmt == "kohya" else "_diffusers.safetensors"
    if step is not None:  # a checkpoint: next to the run's own files, named as sd-scripts names step saves
        name = str(settings.get("output_name") or (run_dir or input_path).name)
        return (run_dir or input_path) / f"{name}-step{step:08d}{suffix}"
    if is_run:
        name = str(settings.get("output_name") or input_path.name)
        return input_path / f"{name}{suffix}"
    return weights.with_name(f"{weights.stem}_{fmt}.safetensors")


def _same_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> bool:
    """An existing file holds exactly these tensors (names, dtypes, shapes, bytes): re-exporting is a no-op."""
    try:
        header, _ = read_header(path)
    except (OSError, SafetensorsFormatError):
        return False
    names = {k for k in header if k != "__metadata__"}
    if names != set(state):
        return False
    for key, tensor in state.items():
        entry = header[key]
        if list(entry.get("shape", [])) != list(tensor.shape) or entry.get("dtype") != _SAFETENSORS_DTYPE.get(tensor.dtype):
            return False
    return file_data_sha256(path) == sshs_model_hash(state)


_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def export_lora(
    input_path,
    output=None,
    fmt: str = "kohya",
    dtype: str = "fp16",
    overwrite: bool = False,
    metadata_overrides: Mapping[str, object] | None = None,
    arch: str | None = None,
) -> Path:
    """Write a kohya (ComfyUI / AUTOMATIC1111) or diffusers LoRA file; return its path.

    `input_path` is a run directory (``pytorch_lora_weights.safetensors`` + ``config.yaml``; the
    kohya file goes to ``<output_name>.safetensors`` there) or any LoRA file `load_any_lora` reads.
    Every check runs before anything is written; a failure raises ExportError and leaves no file.
    """
    return export_with_status(input_path, output, fmt, dtype, overwrite, metadata_overrides, arch)[0]


def export_with_status(input_path, output, fmt, dtype, overwrite, metadata_overrides, arch) -> tuple[Path, bool]:
    """export_lora's work: (the output path, whether it was written; False: it already held these weights).

    A trainer checkpoint folder (checkpoint-N/pytorch_lora_weights.safetensors) exports like its run, as
    of step N; its file's own metadata (written at step N) wins over the run's final settings."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected kohya or diffusers")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected fp16, bf16 or fp32")
    check_arch(arch)
    input_path = Path(input_path)
    if not input_path.exists():
        raise ExportError(f"input not found: {input_path}")

    is_run = input_path.is_dir()
    step = _checkpoint_step(input_path) if is_run else None
    settings: dict = {}
    run_dir = None
    if is_run:
        weights = input_path / RUN_WEIGHTS
        if not weights.is_file():
            what = ("a checkpoint of an older version: resume the run to get checkpoints with LoRA files"
                    if step is not None else "not a finished run directory or a checkpoint folder")
            raise ExportError(f"{input_path} has no {RUN_WEIGHTS}: {what}")
        if step is not None:
            settings, run_dir = _checkpoint_settings(input_path, step)
        else:
            settings = _read_run_settings(input_path)
    else:
        weights = input_path

    out = Path(output) if output is not None else _default_output(input_path, weights, fmt, settings, is_run,
                                                                  step, run_dir)
    if out.exists() and out.resolve() == weights.resolve():
        raise ExportError(f"the output {out} is the input file itself")
    if out.is_dir():
        raise ExportError(f"the output {out} is a folder")
    if out.exists() and not out.is_file():  # --overwrite replaces files, never /dev/... or a pipe
        raise ExportError(f"the output {out} is not a regular file (a device, pipe or socket); not replacing it")
    if not out.parent.is_dir():
        raise ExportError(f"the output folder {out.parent} does not exist")

    tensors, source_metadata = load_lora_file(weights)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{weights.name} holds NaN/inf values ({len(bad)} tensors, e.g. {bad[0]}): the training "
                          f"diverged; a LoRA like that breaks every image, so nothing was written")
    lora, guess = read_state_dict(tensors, source_metadata, arch)
    if arch is None:
        # The keys decide; where they only show "some SD 1.x-like model" (tiny test models, a UNet
        # LoRA without cross-attention widths), the run's base model tells which.
        hint = _arch_hint_from_settings(settings)
        arch = guess.arch
        if hint is not None and (not guess.confident or (guess.weak_family and {hint, arch} <= {SD15, SD2})):
            arch = hint

    settings.setdefault("output_name", out.stem)
    built = build_metadata(settings, arch, lora)
    carried = {
        k: v
        for k, v in source_metadata.items()
        if k.startswith(("ss_", "modelspec.", "flatlora_")) and k not in STRUCTURAL_KEYS and not k.startswith("sshs_")
    }
    # A run directory's settings describe the training; a bare file's (or a checkpoint's) own metadata does.
    metadata = {**carried, **built} if is_run and step is None else {**built, **carried}
    for key, value in (metadata_overrides or {}).items():
        metadata[str(key)] = metadata_text(value)

    torch_dtype = DTYPES[dtype]
    if fmt == "kohya":
        state = lora_to_kohya(lora, arch, dtype=torch_dtype)
    else:
        state, diffusers_metadata = lora_to_diffusers(lora, dtype=torch_dtype)
        metadata.update(diffusers_metadata)
    if out.exists() and not overwrite:
        if out.is_file() and not metadata_overrides and _same_tensors(out, state):
            return out, False  # e.g. the kohya file the trainer wrote: nothing to do, and not an error
        raise ExportError(f"{out} already exists (use --overwrite to replace it)")
    return _write_with_hash(state, out, metadata, overwrite), True


def _write_with_hash(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str], overwrite: bool) -> Path:
    # The hash covers the tensor data only, so it can be computed first and stored in the file.
    digest = sshs_model_hash(state)
    metadata = {**metadata, "sshs_model_hash": digest}
    try:
        save_safetensors_atomic(state, out, metadata, overwrite=overwrite, expected_data_sha256=digest)
    except FileExistsError:
        raise ExportError(f"{out} already exists (use --overwrite to replace it)") from None
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def diffusers_file_contents(
    lora: Lora, settings: Mapping | None, arch: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a diffusers file (what `pipe.load_lora_weights` reads): the adapter metadata
    that keeps lora_alpha, the same provenance (ss_*, modelspec.*, flatlora_*) as the kohya file, its hash."""
    check_arch(arch)
    state, adapter_metadata = lora_to_diffusers(lora, dtype)
    metadata = {**build_metadata(dict(settings or {}), arch, lora), **adapter_metadata,
                "sshs_model_hash": sshs_model_hash(state)}
    return state, metadata


def save_kohya_lora(
    components: Mapping[str, torch.nn.Module | None],
    path,
    settings: Mapping | None = None,
    *,
    adapter_name: str = "default",
    arch: str | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    metadata_overrides: Mapping[str, object] | None = None,
    lora: Lora | None = None,
) -> Path:
    """Write the kohya file of in-memory peft models with full metadata and its sshs_model_hash.

    What the trainer calls at the end of a run: `settings` as for `build_metadata`. `lora`, when given,
    is written instead of the models' current adapters (e.g. a PiSSA LoRA converted for the original base).
    """
    check_arch(arch)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected fp16, bf16 or fp32")
    arch = arch or arch_from_models(components)
    lora = lora if lora is not None else lora_from_models(components, adapter_name)
    if not lora:
        raise ExportError(f"the models have no LoRA layers for adapter {adapter_name!r}")
    path = Path(path)
    settings = dict(settings or {})
    settings.setdefault("output_name", path.stem)
    metadata = build_metadata(settings, arch, lora)
    for key, value in (metadata_overrides or {}).items():
        metadata[str(key)] = metadata_text(value)
    state = lora_to_kohya(lora, arch, dtype=DTYPES[dtype])
    return _write_with_hash(state, path, metadata, overwrite)
