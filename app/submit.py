"""From a filled-in form to queued run folders: check images and paths, then write the folders.

Everything is checked before anything is written, and everything written lands in the new run folders:
uploaded images are decoded (not trusted by name) and copied under safe names into
<run>/instance_images/, prior-preservation class images that must be generated go to <run>/class_images/,
and a typed folder outside the runs folder is only ever read.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatlora_diffusion.config import ConfigError, make_config, save_yaml

from . import plan
from .form import APP_MANAGED
from .runs import APP_META, safe_name, unique_name, write_json_atomic

# What the trainer reads (data.IMAGE_EXTENSIONS), by the format PIL decodes, with the extension stored.
_FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
INSTANCE_DIR = "instance_images"
CLASS_DIR = "class_images"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SubmitError(ValueError):
    """The form cannot become a run; the message is one line for the page."""


def check_image(path: str | os.PathLike, shown_name: str | None = None) -> str:
    """Decode the whole image; return the extension its real format is stored under. Raises SubmitError."""
    from PIL import Image

    shown = shown_name or Path(path).name
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        with Image.open(path) as im:  # verify() checks structure only; decode every pixel too
            im.load()
            if im.width < 8 or im.height < 8:
                raise SubmitError(f"{shown}: image is too small ({im.width}x{im.height})")
    except SubmitError:
        raise
    except Exception as e:
        reason = "too large" if "DecompressionBomb" in type(e).__name__ else "not a readable image"
        raise SubmitError(f"{shown}: {reason}") from None
    if fmt not in _FORMAT_EXT:
        raise SubmitError(f"{shown}: {fmt} images are not used for training; use PNG, JPEG, WebP, BMP or TIFF")
    return _FORMAT_EXT[fmt]


MAX_CAPTION_BYTES = 64 * 1024  # a caption is a line; the bound keeps a stray upload from costing memory


def caption_suffix(values: dict[str, Any]) -> str:
    """The caption files' extension as the trainer reads it (data/records.py adds a missing dot)."""
    ext = values.get("caption_extension") or ".txt"
    return ext if ext.startswith(".") else "." + ext


def split_uploads(paths: Sequence[Path], names: Sequence[str], suffix: str):
    """Uploaded files -> ([(path, name)] images, {image stem: (path, name)} captions), by the name the browser
    reported: a caption is a file with the caption extension, matched to the image of the same name."""
    images, captions = [], {}
    for path, name in zip(paths, names):
        if Path(name).suffix.lower() == suffix.lower():
            captions[Path(name).stem] = (path, name)
        else:
            images.append((path, name))
    return images, captions


def read_caption(path: Path, shown: str) -> str:
    """The caption the trainer will read (the first non-empty line), checked to be short UTF-8 text."""
    raw = Path(path).read_bytes()[: MAX_CAPTION_BYTES + 1]
    if len(raw) > MAX_CAPTION_BYTES:
        raise SubmitError(f"{shown}: a caption file must be under {MAX_CAPTION_BYTES // 1024} KB")
    try:
        text = raw.decode("utf-8-sig")  # Windows editors start files with a BOM
    except UnicodeDecodeError:
        raise SubmitError(f"{shown}: a caption file must be UTF-8 text") from None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        raise SubmitError(f"{shown}: the caption file is empty")
    return line


def _check_uploads(uploads: list[Path], names: list[str], values: dict[str, Any]):
    """[(path, stored extension, caption or None)] for the uploaded images; SubmitError names what is wrong."""
    suffix = caption_suffix(values)
    images, captions = split_uploads(uploads, names, suffix)
    stems = {Path(n).stem for _, n in images}
    for stem, (_, shown) in captions.items():
        if stem not in stems:
            raise SubmitError(f"{shown}: no uploaded image is called {stem}.* (a caption goes with the image of "
                              f"the same name)")
    checked = []
    for path, shown in images:
        caption = captions.get(Path(shown).stem)
        checked.append((path, check_image(path, shown), read_caption(*caption) if caption else None))
    missing = [n for (_, n), (_, _, c) in zip(images, checked) if c is None]
    if not checked:
        raise SubmitError("only caption files were uploaded: add the images they describe")
    if missing and not values.get("instance_prompt"):
        raise SubmitError(f"{missing[0]} has no caption: fill in instance_prompt (e.g. 'a photo of sks dog') or "
                          f"upload {Path(missing[0]).stem}{suffix} with it")
    return checked


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _typed_folder(text: str, what: str) -> Path:
    p = Path(str(text).strip()).expanduser()
    if not p.is_absolute():
        raise SubmitError(f"{what} must be an absolute path, got {text!r}")
    p = p.resolve()
    if not p.exists():
        raise SubmitError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise SubmitError(f"{what} {p} is not a folder")
    if not os.access(p, os.R_OK | os.X_OK):
        raise SubmitError(f"{what} {p} cannot be read")
    return p


def _images_in(folder: Path, depth: int = 1) -> list[Path]:
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in _IMAGE_EXTS:
            found.append(p)
        elif p.is_dir() and depth > 0:
            found += _images_in(p, depth - 1)  # kohya-style "10_sks dog" subfolders
    return found


def check_instance_folder(text: str, instance_prompt: str | None, caption_extension: str = ".txt") -> Path:
    """A typed training-image folder: it exists and the trainer will find captioned, readable images in it."""
    folder = _typed_folder(text, "instance_data_dir")
    try:
        from flatlora_diffusion.data import DataError, scan_image_folder
    except ImportError:  # pragma: no cover - data/ is part of the package
        if not _images_in(folder):
            raise SubmitError(f"instance_data_dir {folder} holds no images") from None
        return folder
    try:
        scan_image_folder(folder, instance_prompt or None, caption_extension, warn=lambda _msg: None)
    except DataError as e:
        raise SubmitError(str(e)) from None
    return folder


def _check_class_folder(text: str, runs_dir: Path, needed: int) -> Path:
    folder = Path(str(text).strip()).expanduser()
    if folder.is_absolute() and _inside(folder, runs_dir):
        if folder.exists() and not folder.is_dir():
            raise SubmitError(f"class_data_dir {folder} is a file, not a folder")
        return folder.resolve()
    folder = _typed_folder(text, "class_data_dir")
    have = len(_images_in(folder, depth=0))
    if have < needed:
        raise SubmitError(
            f"class_data_dir {folder} holds {have} of num_class_images={needed} images and the trainer would "
            f"generate the rest into it; leave class_data_dir empty to keep generated images in the run folder"
        )
    return folder


def _check_model(value: str | None, field: str) -> None:
    if not value:
        return
    from flatlora_diffusion.toyworld import MODEL_NAME

    if value == MODEL_NAME:  # the built-in toy-world model
        return
    p = Path(value).expanduser()
    looks_local = p.is_absolute() or value.startswith((".", "~")) or p.suffix.lower() in (".safetensors", ".ckpt")
    if looks_local and not p.exists():
        raise SubmitError(f"{field}: {value} does not exist")
    if not looks_local and not p.exists() and not _HUB_ID.match(value):
        raise SubmitError(f"{field}: {value!r} is neither an existing path nor a hub id like 'org/model'")


def prepare_runs(
    runs_dir: str | os.PathLike,
    values: dict[str, Any],
    *,
    name: str | None = None,
    ab: bool = False,
    uploads: Sequence[str | os.PathLike] = (),
    upload_names: Sequence[str] | None = None,
) -> list[str]:
    """Write queued run folders for one launch: one, or two for A/B (plain LoRA first, then Flat-LoRA).

    `values` are TrainConfig values from the form. Returns the new run names. Raises SubmitError or
    ConfigError (one line each) before writing anything.
    """
    runs_dir = Path(runs_dir).resolve()
    values = {k: v for k, v in values.items() if k not in APP_MANAGED}
    uploads = [Path(p) for p in uploads or []]
    names = list(upload_names or [p.name for p in uploads])

    # --- check everything ------------------------------------------------------------------------------
    _check_model(values.get("pretrained_model_name_or_path"), "pretrained_model_name_or_path")
    _check_model(values.get("pretrained_vae_model_name_or_path"), "pretrained_vae_model_name_or_path")
    _check_model(values.get("single_file_config"), "single_file_config")
    upload_files = _check_uploads(uploads, names, values) if uploads else []
    if uploads:
        if values.get("dataset_name"):
            raise SubmitError("give the training images either as uploads or as dataset_name, not both")
        if values.get("instance_data_dir"):
            raise SubmitError("give the training images either as uploads or as instance_data_dir, not both")
    elif values.get("instance_data_dir"):
        values["instance_data_dir"] = str(check_instance_folder(
            values["instance_data_dir"], values.get("instance_prompt"), values.get("caption_extension") or ".txt"))
    elif not values.get("dataset_name"):
        raise SubmitError("no training images: upload some, or type the folder that holds them")
    # the form's empty boxes: a run that trains and shows validation images (plan.py), written into config.yaml
    images = len(upload_files) if uploads else plan.count_folder_images(values.get("instance_data_dir"))
    values = plan.resolve(values, images)

    class_dir_typed = values.get("class_data_dir") if values.get("with_prior_preservation") else None
    if class_dir_typed:
        values["class_data_dir"] = str(_check_class_folder(
            class_dir_typed, runs_dir, int(values.get("num_class_images") or 100)))
    if values.get("seed") is None:
        values["seed"] = secrets.randbelow(2**31)  # one seed for both runs of an A/B pair
    if ab and not (isinstance(values.get("flat_sigma", 0.1), (int, float)) and values.get("flat_sigma", 0.1) > 0):
        raise SubmitError("A/B compares plain LoRA with Flat-LoRA: set flat_sigma > 0 for the Flat-LoRA run")

    base = safe_name(name, default=time.strftime("run-%Y%m%d-%H%M%S"))
    variants = [("lora", {"flat_sigma": 0.0}), ("flat", {})] if ab else [(None, {})]
    suffixes = tuple(f"-{v}" for v, _ in variants) if ab else ("",)
    base = unique_name(runs_dir, base, suffixes)

    plans = []
    for (variant, override), suffix in zip(variants, suffixes):
        run_dir = runs_dir / f"{base}{suffix}"
        cfg_values = {**values, **override, "output_dir": str(run_dir)}
        if uploads:
            cfg_values["instance_data_dir"] = str(run_dir / INSTANCE_DIR)
        if values.get("with_prior_preservation") and not class_dir_typed:
            cfg_values["class_data_dir"] = str(run_dir / CLASS_DIR)
        plans.append((run_dir, variant, make_config(cfg_values)))  # ConfigError before anything is written

    # --- write -----------------------------------------------------------------------------------------
    created: list[Path] = []
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        for run_dir, variant, cfg in plans:
            run_dir.mkdir()
            created.append(run_dir)
            if uploads:
                images = run_dir / INSTANCE_DIR
                images.mkdir()
                for i, (src, ext, caption) in enumerate(upload_files):
                    shutil.copyfile(src, images / f"image_{i:03d}{ext}")
                    if caption is not None:  # beside its image, as the trainer reads captions (data/records.py)
                        (images / f"image_{i:03d}{caption_suffix(values)}").write_text(caption + "\n", encoding="utf-8")
            save_yaml(cfg, run_dir / "config.yaml")
            meta = {"created_at": time.time(), "created_by": "flatlora-diffusion app",
                    "uploaded_images": names if uploads else []}
            if ab:
                meta.update(ab_group=base, ab_variant=variant)
            write_json_atomic(run_dir / APP_META, meta)
            write_json_atomic(run_dir / "status.json", {
                "state": "queued", "step": 0, "total": cfg.max_train_steps or 0, "message": "waiting in the queue",
                "started_at": None, "updated_at": time.time(), "finished_at": None, "eta_seconds": None, "pid": None,
            })
    except BaseException:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        raise
    return [d.name for d, _, _ in plans]


__all__ = ["SubmitError", "ConfigError", "check_image", "check_instance_folder", "prepare_runs"]
