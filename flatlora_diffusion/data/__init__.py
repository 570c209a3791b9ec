"""Images in, training examples out: captions, repeats, crops, buckets, class images.

This package turns a folder of images (or a Hugging Face dataset) into the examples the
training loop consumes: pixels in [-1, 1], a prompt, and SDXL's micro-conditioning
(original size, crop corner, target size) for *each* image. Tokenizing prompts and encoding
latents belong to the loop, not here.

Everything that can fail because of the user's data fails early, cheaply (no model loaded,
no image fully decoded) and with one line that says what is wrong and what to do:
:class:`DataError`.

Randomness (crops, flips, batch order) never touches the global RNGs (seeds.py).

    records.py       the user's images and captions -> ImageRecord (folders, kohya repeats, HF datasets)
    buckets.py       aspect-ratio bucket sizes and the bucket of an image
    dataset.py       DreamBoothDataset: records -> TrainExample (resize, crop, flip, micro-conditioning)
    batching.py      bucket-aware batch sampler, collate_fn, make_dataloader
    class_images.py  prior-preservation class images, generated and written atomically
    validate.py      validate_data_args: the data options, checked before any model loads
"""

from .batching import BucketBatchSampler, collate_fn, make_dataloader
from .buckets import BucketConfig, make_buckets, select_bucket
from .class_images import generate_class_images
from .dataset import INTERPOLATION_MODES, DreamBoothDataset, TrainExample
from .errors import DataError
from .records import IMAGE_EXTENSIONS, ImageRecord, load_class_records, load_hf_dataset_records, scan_image_folder
from .validate import validate_data_args

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
