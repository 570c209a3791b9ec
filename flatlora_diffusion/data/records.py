"""The user's images and captions as ImageRecords: an image folder (kohya's "<N>_<tokens>" repeat folders, caption
files), the class-image folder, or a Hugging Face dataset. A folder scan reads image headers only; the pixels are
decoded when the dataset opens a record."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageOps

from .errors import DataError

logger = logging.getLogger("flatlora_diffusion.data")

#: Extensions (lower case) of files taken as images; other files (captions, .DS_Store, ...) are ignored.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

# kohya's folder convention: "<repeats>_<tokens>", e.g. "10_sks dog".
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
_ORIENTATION = ExifTags.Base.Orientation
# EXIF orientations 5..8 involve a quarter turn: width and height swap when displayed.
_QUARTER_TURNS = {5, 6, 7, 8}

WarnFn = Callable[[str], Any]


@dataclass
class ImageRecord:
    """One source image and its caption. Exactly one of ``path`` / ``image`` is set.

    ``image`` holds an in-memory PIL image (rows of a Hugging Face dataset); ``path`` an image file.
    ``repeats`` says how many times the image appears per epoch (kohya's folder prefix).
    """

    path: Path | None
    caption: str
    repeats: int = 1
    image: Image.Image | None = field(default=None, repr=False, compare=False)
    name: str = ""  # how messages refer to the image; defaults to the path

    def __post_init__(self) -> None:
        if (self.path is None) == (self.image is None):
            raise ValueError("ImageRecord needs exactly one of path or image")
        if self.path is not None:
            self.path = Path(self.path)
        if self.repeats < 1:
            raise ValueError(f"ImageRecord.repeats must be >= 1, got {self.repeats}")
        if not self.name:
            self.name = str(self.path) if self.path is not None else "in-memory image"

    def open(self) -> Image.Image:
        """The image as displayed (EXIF orientation applied), in RGB, fully loaded."""
        if self.image is not None:
            return _to_rgb(ImageOps.exif_transpose(self.image))
        with Image.open(self.path) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))

    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, read from the header only (cheap)."""
        if self.image is not None:
            return _oriented_size(self.image)
        with Image.open(self.path) as im:
            return _oriented_size(im)


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make an image unusable
        orientation = 1
    return (h, w) if orientation in _QUARTER_TURNS else (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparent areas become white (plain convert() exposes whatever colour hides under alpha 0)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _readable(p: Path) -> bool:
    """Header + structure check without decoding all pixels (PIL's verify)."""
    try:
        with Image.open(p) as im:
            im.verify()
        return True
    except Exception:
        return False


def _read_caption(image_path: Path, caption_extension: str) -> str | None:
    """First non-empty line of the caption file next to the image (kohya reads one line), or None."""
    txt = image_path.with_suffix(caption_extension)
    if not txt.is_file():
        return None
    # utf-8-sig: captions written by Windows editors often start with a BOM.
    for line in txt.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        if line.strip():
            return line.strip()
    return None


def scan_image_folder(
    root: str | os.PathLike,
    default_prompt: str | None,
    caption_extension: str = ".txt",
    warn: WarnFn | None = None,
    *,
    what: str = "instance data folder",
) -> list[ImageRecord]:
    """Find the training images under ``root`` and give each its caption and repeat count.

    Images are taken from ``root`` itself (repeats 1) and from kohya-style subfolders named
    ``<N>_<tokens>`` (e.g. ``10_sks dog``: repeats 10, tokens "sks dog"). Other subfolders and
    deeper levels are ignored (with a warning for the subfolders).

    Caption precedence, per image:
      1. the same-name caption file (``photo.png`` -> ``photo.txt``; its first non-empty line),
      2. ``default_prompt`` (the --instance_prompt),
      3. the kohya subfolder's tokens.

    Files that PIL cannot verify are skipped with a warning naming them. Order is deterministic:
    root images first, then subfolders, each sorted by name.

    Raises DataError when the folder is missing or not a folder, holds no image, holds no
    readable image, or an image has no caption source at all.
    """
    warn = warn or logger.warning
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{what} '{root}' does not exist; check the path")
    if not root.is_dir():
        raise DataError(f"{what} '{root}' is not a folder; pass the folder that holds the images")

    groups: list[tuple[Path, int, str | None]] = [(root, 1, None)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _KOHYA_FOLDER.match(sub.name)
        if m is None or int(m.group(1)) < 1:
            if any(_is_image_file(p) for p in sub.iterdir()):
                warn(f"ignoring subfolder '{sub}': image subfolders must be named '<repeats>_<tokens>' "
                     f"with repeats >= 1, e.g. '10_sks dog'")
            continue
        groups.append((sub, int(m.group(1)), m.group(2).strip() or None))

    records: list[ImageRecord] = []
    seen = unreadable = 0
    for folder, repeats, tokens in groups:
        for p in sorted(folder.iterdir()):
            if not _is_image_file(p):
                continue
            seen += 1
            if not _readable(p):
                unreadable += 1
                warn(f"skipping '{p}': not a readable image")
                continue
            caption = _read_caption(p, caption_extension) or default_prompt or tokens
            if not caption:
                raise DataError(
                    f"image '{p}' has no caption: add '{p.with_suffix(caption_extension).name}' next to it, "
                    f"pass --instance_prompt, or put it in a folder named like '10_sks dog'"
                )
            records.append(ImageRecord(path=p, caption=caption, repeats=repeats))

    if seen == 0:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{what} '{root}' holds no images ({exts}); add images to it "
                        f"or to subfolders named like '10_sks dog'")
    if not records:
        raise DataError(f"{what} '{root}': none of its {unreadable} image file(s) could be read; "
                        f"replace them with valid images")
    return records


def load_class_records(
    class_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int | None = None,
    caption_extension: str = ".txt",
    warn: WarnFn | None = None,
) -> list[ImageRecord]:
    """Class (prior-preservation) images: like diffusers, only the first ``num_class_images`` are used."""
    records = scan_image_folder(class_dir, class_prompt, caption_extension, warn, what="class data folder")
    return records[:num_class_images] if num_class_images else records


def load_hf_dataset_records(
    dataset_name: str,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    default_prompt: str | None = None,
    cache_dir: str | None = None,
) -> list[ImageRecord]:
    """Records from a Hugging Face dataset (hub id, or a local folder read as "imagefolder").

    The images are held in memory (``ImageRecord.image``). Captions come from ``caption_column``;
    rows whose caption is empty, or all rows when no caption column is given, use ``default_prompt``.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset_name needs the 'datasets' library: pip install datasets") from None

    if caption_column is None and not default_prompt:
        raise DataError(f"dataset '{dataset_name}': give --instance_prompt or --caption_column "
                        f"so that every image has a caption")
    local = Path(dataset_name).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(local), cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load dataset '{dataset_name}': {first_line}") from None

    if "train" not in ds:
        raise DataError(f"dataset '{dataset_name}' has no 'train' split (splits: {', '.join(ds)})")
    train = ds["train"]
    columns = list(train.column_names)
    if image_column not in columns:
        raise DataError(f"dataset '{dataset_name}' has no image column '{image_column}'; "
                        f"pass --image_column, one of: {', '.join(columns)}")
    if caption_column is not None and caption_column not in columns:
        raise DataError(f"dataset '{dataset_name}' has no caption column '{caption_column}'; "
                        f"pass --caption_column, one of: {', '.join(columns)}")

    images = train[image_column]
    captions = train[caption_column] if caption_column else [None] * len(images)
    records = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        caption = (str(cap).strip() if cap is not None else "") or default_prompt
        if not caption:
            raise DataError(f"dataset '{dataset_name}' row {i} has an empty '{caption_column}' caption; "
                            f"pass --instance_prompt as a fallback")
        if not isinstance(img, Image.Image):
            raise DataError(f"dataset '{dataset_name}' column '{image_column}' does not hold images "
                            f"(row {i} is {type(img).__name__}); pass the right --image_column")
        records.append(ImageRecord(path=None, caption=caption, image=img, name=f"{dataset_name}[{i}]"))
    if not records:
        raise DataError(f"dataset '{dataset_name}' has no rows in its 'train' split")
    return records


def readable_images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` that PIL can verify, sorted by name."""
    return [p for p in sorted(folder.iterdir()) if _is_image_file(p) and _readable(p)]
