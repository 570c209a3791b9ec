"""Images in, training examples out: captions, repeats, crops, buckets, class images.

This module turns a folder of images (or a Hugging Face dataset) into the examples the
training loop consumes: pixels in [-1, 1], a prompt, and SDXL's micro-conditioning
(original size, crop corner, target size) for *each* image. Tokenizing prompts and encoding
latents belong to the loop, not here.

Everything that can fail because of the user's data fails early, cheaply (no model loaded,
no image fully decoded) and with one line that says what is wrong and what to do:
:class:`DataError`.

Randomness (crops, flips, batch order) never touches the global RNGs: every draw comes from
a ``torch.Generator`` seeded from ``(seed, epoch, index)``, so two runs with one seed see the
same data, a resumed run sees what the interrupted one would have seen, and the loop's own
noise/timestep draws are not shifted by data loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "INTERPOLATION_MODES",
    "ImageRecord",
    "TrainExample",
    "BucketConfig",
    "DreamBoothDataset",
    "BucketBatchSampler",
    "scan_image_folder",
    "load_class_records",
    "load_hf_dataset_records",
    "make_buckets",
    "select_bucket",
    "collate_fn",
    "make_dataloader",
    "generate_class_images",
    "validate_data_args",
]


class DataError(ValueError):
    """A mistake in the user's data or data options; the message is one line, shown without a traceback."""


#: Extensions (lower case) of files taken as images; other files (captions, .DS_Store, ...) are ignored.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

#: --image_interpolation_mode values (diffusers' names) -> PIL filters.
INTERPOLATION_MODES: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    # torchvision's NEAREST_EXACT is the pixel-centre rule that PIL's NEAREST already follows
    "nearest_exact": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# kohya's folder convention: "<repeats>_<tokens>", e.g. "10_sks dog".
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
_ORIENTATION = ExifTags.Base.Orientation
# EXIF orientations 5..8 involve a quarter turn: width and height swap when displayed.
_QUARTER_TURNS = {5, 6, 7, 8}
_TMP_SUFFIX = ".tmp"

WarnFn = Callable[[str], Any]


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- buckets


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio bucketing options (kohya's --enable_bucket family).

    ``min_reso`` / ``max_reso`` bound each side; None means ``min(256, resolution // 2)`` and
    ``2 * resolution`` (kohya's defaults at 512 px). ``no_upscale`` gives an image smaller than
    resolution² a bucket of its own size (rounded down to ``step``) instead of enlarging it.
    """

    min_reso: int | None = None
    max_reso: int | None = None
    step: int = 64
    no_upscale: bool = False

    def __post_init__(self) -> None:
        # The VAE downsamples by 8: a side that is not a multiple of 8 has no whole latent.
        if self.step < 8 or self.step % 8:
            raise DataError(f"bucket step must be a positive multiple of 8 (got {self.step}); try 64")
        if self.min_reso is not None and self.max_reso is not None and self.min_reso > self.max_reso:
            raise DataError(f"bucket min resolution {self.min_reso} is above the max {self.max_reso}")

    def resolutions(self, resolution: int) -> list[tuple[int, int]]:
        return make_buckets(resolution, self.min_reso, self.max_reso, self.step)


def make_buckets(
    resolution: int, min_reso: int | None = None, max_reso: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)``: sides are multiples of ``step`` within [min_reso, max_reso]
    and every area is at most ``resolution²`` (kohya's construction: for each width, the tallest
    height that fits the area; plus the largest square). Sorted by aspect ratio (w/h)."""
    if step < 1 or resolution < step:
        raise DataError(f"bucket step {step} must be between 1 and the resolution {resolution}")
    if min_reso is None:
        min_reso = min(256, resolution // 2)
    if max_reso is None:
        max_reso = 2 * resolution
    lo = max(step, math.ceil(min_reso / step) * step)
    hi = max(lo, (max_reso // step) * step)
    area = resolution * resolution

    side = (resolution // step) * step
    buckets = {(side, side)}
    for w in range(lo, hi + 1, step):
        h = min(hi, (area // w) // step * step)
        if h >= lo:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def select_bucket(
    size: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    *,
    resolution: int | None = None,
    step: int = 64,
    no_upscale: bool = False,
) -> tuple[int, int]:
    """The bucket ``(w, h)`` for an image of ``size`` ``(w, h)``: the one whose aspect ratio is closest
    in log space (so 2:1 and 1:2 are treated alike). With ``no_upscale``, an image of at most
    ``resolution²`` pixels gets its own size rounded down to ``step`` instead."""
    w, h = size
    if no_upscale and resolution is not None and w * h <= resolution * resolution:
        return max(step, w // step * step), max(step, h // step * step)
    log_ar = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))


# --------------------------------------------------------------------------- examples


@dataclass
class TrainExample:
    """One image ready for the loop. Sizes are (height, width), coordinates (top, left), as SDXL's
    add_time_ids expect: original_size of the real image (after EXIF), crop_top_left in the resized
    image, target_size of the crop."""

    pixel_values: torch.Tensor  # float32 [C, H, W] in [-1, 1]
    prompt: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    is_class: bool = False


def _derive_seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _prepare(
    im: Image.Image,
    target: tuple[int, int],
    *,
    center_crop: bool,
    random_flip: bool,
    resample: Image.Resampling,
    generator: torch.Generator,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize ``im`` to cover ``target`` (w, h), maybe flip, crop. Returns pixels and (top, left).

    The crop corner is in the coordinates of the resized (and flipped, if flipped) image: the
    image the model actually sees a window of, which is what SDXL's crop conditioning describes.
    """
    tw, th = target
    w, h = im.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample=resample)
    # Both draws happen whatever the options, so turning flips on does not change the crops.
    flip = bool(torch.rand((), generator=generator) < 0.5)
    rand_top = int(torch.randint(0, nh - th + 1, (), generator=generator))
    rand_left = int(torch.randint(0, nw - tw + 1, (), generator=generator))
    if random_flip and flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    else:
        top, left = rand_top, rand_left
    im = im.crop((left, top, left + tw, top + th))
    arr = np.asarray(im, dtype=np.uint8)
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return pixels, (top, left)


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (plus optional class images for prior preservation) as training items.

    Length: the instance records expanded by their own ``repeats`` and by the global ``repeats``
    multiplier (diffusers' --repeats); with class images, ``max(instances, classes)`` as in diffusers.

    ``dataset[i]`` is a tuple: ``(instance,)`` or, with class records, ``(instance, class)`` where
    the class image cycles (``i % num_class``). :func:`collate_fn` puts all instance examples of a
    batch first and the class examples after them, so the loop can ``chunk(2)`` the batch.

    Each image is resized to cover its target size (``resolution²``, or its aspect-ratio bucket)
    and cropped (center, or random); micro-conditioning comes from that very image, class images
    included (diffusers reuses the instance image's values for the class image). A class image
    uses its instance partner's target size, so both halves of a batch stack together.

    Crops and flips come from a generator seeded with ``(seed, epoch, index, role)``; call
    :meth:`set_epoch` (or the sampler's) each epoch. With DataLoader workers, keep
    ``persistent_workers=False`` (the default) so workers see the new epoch.
    """

    def __init__(
        self,
        instance_records: Sequence[ImageRecord],
        class_records: Sequence[ImageRecord] | None = None,
        *,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        interpolation: str = "lanczos",
        buckets: None | bool | BucketConfig | Sequence[tuple[int, int]] = None,
        repeats: int = 1,
        seed: int | None = None,
    ) -> None:
        if not instance_records:
            raise DataError("no instance images to train on")
        if not isinstance(resolution, int) or resolution <= 0:
            raise DataError(f"resolution must be a positive integer, got {resolution!r}")
        if repeats < 1:
            raise DataError(f"--repeats must be >= 1, got {repeats}")
        key = interpolation.lower()
        if key not in INTERPOLATION_MODES:
            raise DataError(f"unknown --image_interpolation_mode '{interpolation}'; "
                            f"use one of: {', '.join(INTERPOLATION_MODES)}")
        self.resample = INTERPOLATION_MODES[key]
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        # No seed: still never the global RNG; draw one from the OS and keep it (self.seed).
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 62)
        self.epoch = 0

        self.instance_records = list(instance_records)
        self.class_records = list(class_records or [])
        self._instance_index = [i for i, r in enumerate(self.instance_records) for _ in range(r.repeats * repeats)]
        self._class_index = [i for i, r in enumerate(self.class_records) for _ in range(r.repeats)]

        self.buckets, self._bucket_list = self._resolve_buckets(buckets)
        self._record_target = [self._target_for(r) for r in self.instance_records]

    # -- construction helpers
    def _resolve_buckets(self, buckets) -> tuple[BucketConfig | None, list[tuple[int, int]]]:
        """(config, bucket sizes) from None/False, True, a BucketConfig, or an explicit (w, h) list."""
        if buckets is None or buckets is False:
            return None, []
        if buckets is True:
            buckets = BucketConfig()
        if isinstance(buckets, BucketConfig):
            if buckets.step > self.resolution:  # e.g. step 64 at a 32 px test resolution
                buckets = dataclasses.replace(buckets, step=self.resolution)
            return buckets, buckets.resolutions(self.resolution)
        sizes = [(int(w), int(h)) for w, h in buckets]
        if not sizes:
            raise DataError("the bucket list is empty")
        if any(v <= 0 or v % 8 for b in sizes for v in b):
            raise DataError(f"bucket sizes must be positive multiples of 8 (got {sizes})")
        return BucketConfig(step=math.gcd(*(v for b in sizes for v in b))), sizes

    def _target_for(self, record: ImageRecord) -> tuple[int, int]:
        if self.buckets is None:
            return self.resolution, self.resolution
        try:
            size = record.size()
        except Exception as e:
            raise DataError(f"cannot read image '{record.name}': {e}") from None
        return select_bucket(size, self._bucket_list, resolution=self.resolution,
                             step=self.buckets.step, no_upscale=self.buckets.no_upscale)

    # -- Dataset protocol
    @property
    def num_instance_images(self) -> int:
        return len(self._instance_index)

    @property
    def num_class_images(self) -> int:
        return len(self._class_index)

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self._class_index)

    def __len__(self) -> int:
        return max(self.num_instance_images, self.num_class_images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """Target size ``(w, h)`` of item ``index`` (all items when buckets are off: resolution²)."""
        return self._record_target[self._instance_index[index % self.num_instance_images]]

    def __getitem__(self, index: int) -> tuple[TrainExample, ...]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        target = self.bucket_of(index)
        rec = self.instance_records[self._instance_index[index % self.num_instance_images]]
        items = [self._example(rec, target, index, is_class=False)]
        if self._class_index:
            crec = self.class_records[self._class_index[index % self.num_class_images]]
            items.append(self._example(crec, target, index, is_class=True))
        return tuple(items)

    def _example(self, record: ImageRecord, target: tuple[int, int], index: int, *, is_class: bool) -> TrainExample:
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, index, is_class))
        im = record.open()
        original = (im.height, im.width)
        pixels, crop = _prepare(im, target, center_crop=self.center_crop, random_flip=self.random_flip,
                                resample=self.resample, generator=gen)
        return TrainExample(pixels, record.caption, original, crop, (target[1], target[0]), is_class)


# --------------------------------------------------------------------------- batching


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices whose items share one bucket (one target size), shuffled per epoch.

    Indices are shuffled within each bucket, cut into batches (the last one of a bucket may be
    short unless ``drop_last``), and the batches of all buckets shuffled together; the order
    comes from ``(seed, epoch)`` only. With buckets off every item shares one bucket, so this is
    a plain seeded shuffling batch sampler.

    The epoch is the dataset's: ``set_epoch`` here sets it there too, and accelerate's prepared
    loader calls ``dataset.set_epoch`` when it wraps this sampler for several processes.
    """

    def __init__(self, dataset: DreamBoothDataset, batch_size: int, seed: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise DataError(f"--train_batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(dataset)):
            groups.setdefault(dataset.bucket_of(i), []).append(i)
        self._groups = [groups[k] for k in sorted(groups)]

    @property
    def epoch(self) -> int:
        return getattr(self.dataset, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        div = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return sum(div(len(g)) for g in self._groups)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, "batches"))
        batches = []
        for group in self._groups:
            order = [group[j] for j in torch.randperm(len(group), generator=gen).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        for j in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[j]


def collate_fn(items: Sequence[TrainExample | Sequence[TrainExample]]) -> dict[str, Any]:
    """Stack dataset items into a batch: all instance examples first, then all class examples.

    Returns ``pixel_values`` [B, C, H, W], ``prompts`` (list of B str), ``original_sizes``,
    ``crop_top_lefts``, ``target_sizes`` (long [B, 2]), ``time_ids`` (float [B, 6]: SDXL's
    add_time_ids, original + crop + target) and ``is_class`` (bool [B]).
    """
    flat: list[TrainExample] = []
    for item in items:
        flat.extend([item] if isinstance(item, TrainExample) else item)
    examples = [e for e in flat if not e.is_class] + [e for e in flat if e.is_class]
    shapes = {tuple(e.pixel_values.shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"images of one batch have different sizes {sorted(shapes)}; "
                         f"with buckets, batch with BucketBatchSampler")
    original = torch.tensor([e.original_size for e in examples], dtype=torch.long)
    crop = torch.tensor([e.crop_top_left for e in examples], dtype=torch.long)
    target = torch.tensor([e.target_size for e in examples], dtype=torch.long)
    return {
        "pixel_values": torch.stack([e.pixel_values for e in examples]).contiguous(),
        "prompts": [e.prompt for e in examples],
        "original_sizes": original,
        "crop_top_lefts": crop,
        "target_sizes": target,
        "time_ids": torch.cat([original, crop, target], dim=1).float(),
        "is_class": torch.tensor([e.is_class for e in examples], dtype=torch.bool),
    }


def make_dataloader(
    dataset: DreamBoothDataset, batch_size: int, seed: int, num_workers: int = 0, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with :class:`BucketBatchSampler` and :func:`collate_fn`.

    It carries its own generator: a DataLoader without one draws its base seed from the global
    torch RNG at every epoch, shifting the loop's noise and timestep draws.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=BucketBatchSampler(dataset, batch_size, seed, drop_last=drop_last),
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(_derive_seed(seed, "loader")),
    )


# --------------------------------------------------------------------------- class images


def _readable_images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if _is_image_file(p) and _readable(p)]


def generate_class_images(
    pipeline: Callable[..., Any],
    class_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int,
    sample_batch_size: int = 4,
    seed: int | None = 0,
    progress: Callable[[int, int], Any] | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> int:
    """Top ``class_dir`` up to ``num_class_images`` readable images with ``pipeline`` (a loaded
    diffusers text-to-image pipeline, or any callable returning an object with ``.images``).

    Image number ``k`` (counting all images the folder will hold) uses its own CPU generator seeded
    from ``(seed, class_prompt, k)``: the same starting noise whatever the batch size or device
    (pixels may still differ by a rounding step across batch sizes: batched kernels). Files are named
    ``class-<k>-<prompt hash>.png`` and written to a hidden temporary file, then renamed, so an
    interrupted run leaves no half-written image. ``progress(done, missing)`` is called after each
    batch. Returns the number of images generated (0 when the folder already has enough).
    """
    if sample_batch_size < 1:
        raise DataError(f"--sample_batch_size must be >= 1, got {sample_batch_size}")
    class_dir = Path(class_dir).expanduser()
    if class_dir.exists() and not class_dir.is_dir():
        raise DataError(f"class data folder '{class_dir}' is not a folder")
    class_dir.mkdir(parents=True, exist_ok=True)
    for stale in class_dir.glob(f".class-*{_TMP_SUFFIX}"):  # left by a killed run
        stale.unlink(missing_ok=True)

    have = len(_readable_images_in(class_dir))
    missing = num_class_images - have
    if missing <= 0:
        return 0
    prompt_hash = hashlib.sha1(class_prompt.encode()).hexdigest()[:10]
    seed = 0 if seed is None else seed
    kwargs = dict(pipeline_kwargs or {})

    done = 0
    k = have
    while done < missing:
        n = min(sample_batch_size, missing - done)
        generators = [torch.Generator().manual_seed(_derive_seed(seed, class_prompt, k + j)) for j in range(n)]
        images = pipeline(prompt=[class_prompt] * n, generator=generators, **kwargs).images
        if len(images) != n:
            raise RuntimeError(f"class image pipeline returned {len(images)} images for {n} prompts")
        for image in images:
            final = class_dir / f"class-{k:05d}-{prompt_hash}.png"
            while final.exists():  # never overwrite a file the user put there
                k += 1
                final = class_dir / f"class-{k:05d}-{prompt_hash}.png"
            _atomic_save_png(image, final)
            k += 1
            done += 1
        if progress is not None:
            progress(done, missing)
    return done


def _atomic_save_png(image: Image.Image, final: Path) -> None:
    tmp = final.with_name(f".{final.name}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- validation


def validate_data_args(
    instance_data_dir: str | os.PathLike | None,
    dataset_name: str | None,
    instance_prompt: str | None,
    with_prior_preservation: bool,
    class_data_dir: str | os.PathLike | None,
    class_prompt: str | None,
    resolution: int,
    *,
    caption_column: str | None = None,
    caption_extension: str = ".txt",
    interpolation: str | None = None,
    warn: WarnFn | None = None,
) -> list[ImageRecord] | None:
    """Check the data options before any model loads; raise DataError on the first problem.

    Scans the instance folder (header checks only), so a missing caption or an unreadable image
    set is reported now, not after minutes of model loading. Returns the instance records (None
    for --dataset_name, which is only checked when loaded).
    """
    warn = warn or logger.warning
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        hint = max(8, math.floor(resolution / 8 + 0.5) * 8) if isinstance(resolution, (int, float)) else 512
        raise DataError(f"--resolution must be a positive multiple of 8 (got {resolution!r}); try {hint}")
    if interpolation is not None and interpolation.lower() not in INTERPOLATION_MODES:
        raise DataError(f"unknown --image_interpolation_mode '{interpolation}'; "
                        f"use one of: {', '.join(INTERPOLATION_MODES)}")
    if not instance_data_dir and not dataset_name:
        raise DataError("no training images: pass --instance_data_dir (a folder of images) or --dataset_name")
    if instance_data_dir and dataset_name:
        raise DataError("pass only one of --instance_data_dir and --dataset_name")

    if with_prior_preservation:
        if not class_prompt:
            raise DataError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
        if not class_data_dir:
            raise DataError("--with_prior_preservation needs --class_data_dir (a folder for class images; "
                            "missing ones are generated)")
        if Path(class_data_dir).exists() and not Path(class_data_dir).is_dir():
            raise DataError(f"--class_data_dir '{class_data_dir}' is a file, not a folder")
    elif class_data_dir or class_prompt:
        warn("--class_data_dir / --class_prompt are ignored without --with_prior_preservation")

    if dataset_name:
        if not instance_prompt and not caption_column:
            raise DataError("--dataset_name needs --instance_prompt or --caption_column so every image has a caption")
        return None
    return scan_image_folder(instance_data_dir, instance_prompt, caption_extension, warn)
