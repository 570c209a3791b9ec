"""DreamBoothDataset: instance (and class) records as training examples: pixels in [-1, 1], a prompt, and
SDXL's micro-conditioning (original size, crop corner, target size) of *each* image, with its crop and flip
drawn from (seed, epoch, index)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .buckets import BucketConfig, select_bucket
from .errors import DataError
from .records import ImageRecord
from .seeds import derive_seed

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


def _draw_flip(generator: torch.Generator) -> bool:
    """An example's first draw: its flip (made whatever the options, so that flips do not move the crops)."""
    return bool(torch.rand((), generator=generator) < 0.5)


def _prepare(
    im: Image.Image,
    target: tuple[int, int],
    *,
    center_crop: bool,
    random_flip: bool,
    resample: Image.Resampling,
    generator: torch.Generator,
    flip: bool | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize ``im`` to cover ``target`` (w, h), maybe flip, crop. Returns pixels and (top, left).
    ``flip`` given: that orientation whatever the draw (the draws still happen, so the crop is the same).

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
    drawn = _draw_flip(generator)
    flip = (random_flip and drawn) if flip is None else flip
    rand_top = int(torch.randint(0, nh - th + 1, (), generator=generator))
    rand_left = int(torch.randint(0, nw - tw + 1, (), generator=generator))
    if flip:
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
        return self.oriented(index, None)

    def _example(self, record: ImageRecord, target: tuple[int, int], index: int, *, is_class: bool,
                 flip: bool | None = None) -> TrainExample:
        gen = self._generator(index, is_class)
        im = record.open()
        original = (im.height, im.width)
        pixels, crop = _prepare(im, target, center_crop=self.center_crop, random_flip=self.random_flip,
                                resample=self.resample, generator=gen, flip=flip)
        return TrainExample(pixels, record.caption, original, crop, (target[1], target[0]), is_class)

    def oriented(self, index: int, flip: bool | None) -> tuple[TrainExample, ...]:
        """Item ``index`` of this epoch; ``flip`` given: every example in that orientation whatever the draw (a
        latent cache encodes both and takes the one the draw picks, see ``flipped``); None: as drawn."""
        target = self.bucket_of(index)
        rec = self.instance_records[self._instance_index[index % self.num_instance_images]]
        items = [self._example(rec, target, index, is_class=False, flip=flip)]
        if self._class_index:
            crec = self.class_records[self._class_index[index % self.num_class_images]]
            items.append(self._example(crec, target, index, is_class=True, flip=flip))
        return tuple(items)

    def flipped(self, index: int, is_class: bool) -> bool:
        """Whether item ``index``'s (class) example is flipped in this epoch: the draw ``__getitem__`` makes."""
        return self.random_flip and _draw_flip(self._generator(index, is_class))

    def _generator(self, index: int, is_class: bool) -> torch.Generator:
        """The draws of item ``index``'s (class) example in this epoch: its flip, then its crop."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index, is_class))
