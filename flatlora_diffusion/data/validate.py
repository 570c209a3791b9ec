"""validate_data_args: the data options checked before any model loads."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from .dataset import INTERPOLATION_MODES
from .errors import DataError
from .records import ImageRecord, WarnFn, scan_image_folder

logger = logging.getLogger("flatlora_diffusion.data")


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
