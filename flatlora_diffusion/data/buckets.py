"""Aspect-ratio buckets (kohya's --enable_bucket): the bucket sizes for a resolution, and the bucket of an
image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DataError


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
