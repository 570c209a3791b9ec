"""safetensors metadata of a LoRA file, as ComfyUI / AUTOMATIC1111 and sd-scripts read it: ss_*, modelspec.*,
flatlora_*; and the file hash (sshs_model_hash) the UIs show."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from ..safetensors_io import file_data_sha256, tensors_data_sha256
from .arch import check_arch
from .lora import Lora, most_common
from .names import SD2, SD15, SDXL, TE1, TE2


_BASE_MODEL_VERSION = {SD15: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}
_DEFAULT_RESOLUTION = {SD15: 512, SD2: 768, SDXL: 1024}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# metadata keys that carry the file's own facts (recomputed on every export, never carried over)
STRUCTURAL_KEYS = (
    "ss_base_model_version",
    "ss_v2",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.sai_model_spec",
)


def metadata_text(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def is_set(value) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _resolution(value, arch: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, str):
        nums = [int(x) for x in re.findall(r"\d+", value)]
        if len(nums) == 1:
            return nums[0], nums[0]
        if len(nums) >= 2:
            return nums[0], nums[1]
    if isinstance(value, (int, float)) and value > 0:
        return int(value), int(value)
    size = _DEFAULT_RESOLUTION[arch]
    return size, size


def _timestamp(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _image_files(folder) -> list[Path]:
    try:
        folder = Path(folder)
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    except (OSError, TypeError):
        return []


def _tags(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _image_folders(data_dir, default_prompt, caption_extension) -> dict[str, tuple[int, list[str]]]:
    """{folder name: (repeats, captions)} of an instance folder as the trainer reads it (kohya "N_token"
    subfolders included); empty when the folder is not on this machine (an exported run from elsewhere)."""
    if not data_dir:
        return {}
    from ..data import DataError, scan_image_folder

    try:
        records = scan_image_folder(data_dir, default_prompt, caption_extension, warn=lambda *a, **k: None)
    except (DataError, OSError):
        return {}
    folders: dict[str, tuple[int, list[str]]] = {}
    for record in records:
        name = record.path.parent.name
        folders.setdefault(name, (record.repeats, []))[1].append(record.caption)
    return folders


def _dataset_facts(s: Mapping) -> dict[str, str]:
    """ss_tag_frequency / ss_dataset_dirs / image counts the way sd-scripts writes them."""
    out: dict[str, str] = {}
    data_dir = s.get("instance_data_dir")
    repeats = int(s.get("repeats") or 1)
    folders = _image_folders(data_dir, s.get("instance_prompt"), s.get("caption_extension") or ".txt")
    if not folders:
        count = int(s.get("num_train_images") or s.get("num_instance_images") or 0)
        if data_dir or count:
            name = Path(str(data_dir)).name if data_dir else "instance"
            folders = {name: (1, [s.get("instance_prompt") or ""] * count)}
    if folders:
        # One entry per image folder by its name, as sd-scripts writes them ("3_sks toy": n_repeats 3).
        out["ss_tag_frequency"] = json.dumps(
            {name: dict(Counter(tag for caption in captions for tag in _tags(caption)))
             for name, (_, captions) in folders.items()}
        )
        out["ss_dataset_dirs"] = json.dumps(
            {name: {"n_repeats": n * repeats, "img_count": len(captions)} for name, (n, captions) in folders.items()}
        )
        out["ss_num_train_images"] = str(sum(n * repeats * len(captions) for n, captions in folders.values()))
    if s.get("with_prior_preservation"):
        class_dir = s.get("class_data_dir")
        class_count = len(_image_files(class_dir)) if class_dir else 0
        class_count = max(class_count, int(s.get("num_class_images") or 0))
        out["ss_num_reg_images"] = str(class_count)
        if class_dir:
            out["ss_reg_dataset_dirs"] = json.dumps(
                {Path(str(class_dir)).name: {"n_repeats": 1, "img_count": class_count}}
            )
    else:
        out["ss_num_reg_images"] = "0"
    return out


def _model_name(value) -> str | None:
    if not value:
        return None
    text = str(value)
    path = Path(text)
    return path.name if (path.is_absolute() or text.startswith(".") or path.exists()) else text


def _lora_summary(lora: Lora | None) -> tuple[int | None, float | None, bool]:
    if not lora:
        return None, None, False
    modules = [m for mods in lora.values() for m in mods.values()]
    return (
        most_common(m.rank for m in modules),
        most_common(float(m.alpha) for m in modules),
        any(m.dora_scale is not None for m in modules),
    )


def _num(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _text_encoder_trained(s: Mapping, lora: Lora | None) -> bool:
    """The file holds text-encoder LoRA (the truth when the weights are at hand), or the run trained one."""
    if lora:
        return any(lora.get(c) for c in (TE1, TE2))
    return bool(s.get("train_text_encoder"))


def _warmup_steps_used(s: Mapping):
    """The warm-up the schedule really had: diffusers' "constant" schedule ignores --lr_warmup_steps."""
    if not is_set(s.get("lr_warmup_steps")):
        return None
    return 0 if s.get("lr_scheduler") == "constant" else s["lr_warmup_steps"]


def _flat_settings(s: Mapping, lora: Lora | None) -> dict:
    """The flat_* settings that describe what training did. Plain LoRA (sigma 0, or no perturbed model)
    keeps only flat_sigma = 0; the perturbed targets are those that were trained."""
    flat = {k: v for k, v in s.items() if k.startswith("flat_") and is_set(v)}
    if isinstance(s.get("flat_targets"), (list, tuple)):
        trained_te = _text_encoder_trained(s, lora)
        flat["flat_targets"] = [t for t in s["flat_targets"] if t != "text_encoder" or trained_te]
    if "flat_sigma" in flat and (not float(flat["flat_sigma"]) or flat.get("flat_targets") == []):
        return {"flat_sigma": 0.0}
    return flat


def _comment(s: Mapping, flat: Mapping) -> str:
    if "flat_sigma" not in flat:
        return "written by flatlora-diffusion"
    if not float(flat["flat_sigma"]):
        return "DreamBooth LoRA (flatlora-diffusion; plain LoRA, sigma 0)"
    return f"DreamBooth Flat-LoRA (flatlora-diffusion; sigma {flat['flat_sigma']}, {flat.get('flat_schedule', 'cosine')})"


def build_metadata(
    settings: Mapping | None = None,
    arch: str = SD15,
    lora: Lora | None = None,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """safetensors metadata (all str) for ComfyUI / AUTOMATIC1111: ss_*, modelspec.*, flatlora_*.

    `settings` is a plain dict named like the diffusers DreamBooth flags (output_name,
    pretrained_model_name_or_path, rank, lora_alpha, learning_rate, text_encoder_lr, optimizer, seed,
    max_train_steps, mixed_precision, resolution, noise_offset, snr_gamma, prior_loss_weight,
    instance_prompt, instance_data_dir, flat_sigma, flat_schedule, flat_seed, use_dora, ...); missing
    keys are left out. `lora`, when given, is the truth for network dim/alpha and DoRA. The file
    hash (sshs_model_hash) is added by the writer, since it depends on the written tensors.
    """
    check_arch(arch)
    s = dict(settings or {})
    md: dict[str, str] = {}

    def put(key, value):
        if is_set(value):
            md[key] = metadata_text(value)

    started = _timestamp(s.get("training_started_at")) or (now if now is not None else time.time())
    finished = _timestamp(s.get("training_finished_at"))
    width, height = _resolution(s.get("resolution"), arch)
    output_name = s.get("output_name")
    rank, alpha, dora = _lora_summary(lora)
    use_rslora = bool(s.get("use_rslora"))
    if rank is None and is_set(s.get("rank")):
        rank = int(s["rank"])
    if alpha is None and is_set(s.get("lora_alpha")):
        alpha = float(s["lora_alpha"]) * (math.sqrt(rank) if use_rslora and rank else 1.0)
    if alpha is None and rank is not None:
        alpha = float(rank)
    dora = dora or bool(s.get("use_dora"))

    # --- what AUTOMATIC1111 reads
    put("ss_output_name", output_name)
    put("ss_sd_model_name", _model_name(s.get("pretrained_model_name_or_path")))
    md["ss_base_model_version"] = _BASE_MODEL_VERSION[arch]
    if arch != SDXL:
        md["ss_v2"] = metadata_text(arch == SD2)
    md["ss_network_module"] = "networks.lora"
    if rank is not None:
        md["ss_network_dim"] = str(rank)
    if alpha is not None:
        md["ss_network_alpha"] = _num(alpha)  # the effective alpha: ss_network_alpha / dim = scale
    network_args: dict[str, str] = {}
    if dora:
        network_args.update({"dora_wd": "True", "wd_on_output": "True"})
    if use_rslora:
        network_args.update({"rs_lora": "True"})
        if is_set(s.get("lora_alpha")):
            network_args["peft_lora_alpha"] = str(s["lora_alpha"])
    md["ss_network_args"] = json.dumps(network_args)
    md["ss_training_started_at"] = repr(float(started))
    if finished is not None:
        md["ss_training_finished_at"] = repr(float(finished))
    md["ss_resolution"] = f"({width}, {height})"
    md.update(_dataset_facts(s))

    # --- what sd-scripts writes besides
    lr = s.get("learning_rate")
    put("ss_learning_rate", lr)
    put("ss_unet_lr", s.get("unet_lr", lr))
    if _text_encoder_trained(s, lora):  # a text-encoder lr of a run that never trained one is no fact of the file
        put("ss_text_encoder_lr", s.get("text_encoder_lr") if is_set(s.get("text_encoder_lr")) else lr)
    optimizer = s.get("optimizer")
    if s.get("use_8bit_adam") and str(optimizer or "adamw").lower() == "adamw":
        optimizer = "AdamW8bit"
    put("ss_optimizer", optimizer)
    put("ss_lr_scheduler", s.get("lr_scheduler"))
    put("ss_lr_warmup_steps", _warmup_steps_used(s))
    put("ss_seed", s.get("seed"))
    steps = next((s[k] for k in ("global_step", "steps", "max_train_steps") if is_set(s.get(k))), None)
    put("ss_steps", steps)
    put("ss_max_train_steps", s.get("max_train_steps"))
    put("ss_batch_size_per_device", s.get("train_batch_size"))
    put("ss_gradient_accumulation_steps", s.get("gradient_accumulation_steps"))
    put("ss_gradient_checkpointing", s.get("gradient_checkpointing"))
    put("ss_max_grad_norm", s.get("max_grad_norm"))
    put("ss_mixed_precision", s.get("mixed_precision"))
    put("ss_noise_offset", s.get("noise_offset"))
    put("ss_min_snr_gamma", s.get("snr_gamma"))
    if s.get("with_prior_preservation") or is_set(s.get("prior_loss_weight")):
        put("ss_prior_loss_weight", s.get("prior_loss_weight"))
    put("ss_clip_skip", s.get("clip_skip"))
    put("ss_caption_dropout_rate", s.get("caption_dropout_rate"))
    flat = _flat_settings(s, lora)
    md["ss_training_comment"] = metadata_text(s.get("training_comment") or _comment(s, flat))

    # --- ModelSpec (Stability AI), as sd-scripts writes it
    md["modelspec.sai_model_spec"] = "1.0.0"
    base = {SD15: "stable-diffusion-v1", SDXL: "stable-diffusion-xl-v1-base"}.get(arch)
    if arch == SD2:
        v_pred = str(s.get("prediction_type", "")).startswith("v")
        base = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    md["modelspec.architecture"] = f"{base}/lora"
    md["modelspec.implementation"] = (
        "https://github.com/Stability-AI/generative-models" if arch == SDXL else "diffusers"
    )
    put("modelspec.title", s.get("title") or output_name)
    md["modelspec.resolution"] = f"{width}x{height}"
    md["modelspec.date"] = _dt.datetime.fromtimestamp(int(finished or started)).isoformat()
    put("modelspec.trigger_phrase", s.get("instance_prompt"))
    put("modelspec.description", s.get("description"))
    put("modelspec.author", s.get("author"))
    put("modelspec.license", s.get("license"))
    put("modelspec.tags", s.get("tags"))
    pred = s.get("prediction_type")
    if is_set(pred):
        md["modelspec.prediction_type"] = "v" if str(pred).startswith("v") else "epsilon"
    put("modelspec.encoder_layer", s.get("clip_skip"))

    # --- Flat-LoRA settings under our own keys
    for key, value in sorted(flat.items()):
        md["flatlora_" + key[len("flat_") :]] = metadata_text(value)
    try:
        from .. import __version__

        md["flatlora_version"] = __version__
    except ImportError:  # pragma: no cover - only when the package is half-installed
        pass
    return md


def sshs_model_hash(source) -> str:
    """AUTOMATIC1111's / sd-scripts' LoRA hash: sha256 of a safetensors file's tensor data section.

    `source` is a file path (the written file) or a dict of tensors (the hash the file will have).
    """
    if isinstance(source, Mapping):
        return tensors_data_sha256(source)
    return file_data_sha256(source)
