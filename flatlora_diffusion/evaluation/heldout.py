"""Which images a run is scored on: its instance images, and held-out images of the same subject.

gap = loss(held-out) - loss(instance): how much worse the trained model denoises unseen images of the subject
than the ones it was trained on (an overfitting measure; it says nothing about image quality on its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data import DataError, ImageRecord, load_hf_dataset_records, scan_image_folder
from .runs import EvalInputError, RunInfo


def heldout_images_for(run: RunInfo) -> Path | Sequence[ImageRecord] | None:
    """Held-out images of the run's subject that the run itself can name, used when --eval_data_dir is not given.

    The hook for toy-world runs: their renderer can draw unseen views of the trained subject, and this
    function is where it will return them (a folder like --eval_data_dir, or a list of data.ImageRecord
    with captions). For any other run there is no held-out set to guess, so: None (held-out loss and gap are
    reported as null).

    A toy-world run gets TOYWORLD_HELDOUT fresh renders of its subject on the instance background (the same
    distribution as its instance images, other sizes and places), captioned with its instance prompt."""
    from .toyscores import is_toyworld

    if is_toyworld(run):
        return toyworld_heldout_records(run)
    return None


TOYWORLD_HELDOUT = 8


def toyworld_heldout_records(run: RunInfo, n: int = TOYWORLD_HELDOUT) -> list[ImageRecord]:
    """The renders are written by the toy world's own folder writer into a temporary folder, then held in
    memory: the records outlive the folder, and nothing is left behind in the run or elsewhere."""
    import tempfile

    from ..toyworld.data import write_heldout_subject_images

    caption = _captioned(run) or ""
    with tempfile.TemporaryDirectory(prefix="flatlora-heldout-") as tmp:
        paths = write_heldout_subject_images(tmp, n=n, size=run.resolution)
        # the name (not the temporary path) keys the encoded-set cache: equal for every run and every call
        return [ImageRecord(path=None, image=ImageRecord(path=p, caption=caption).open(), caption=caption,
                            name=f"toyworld-heldout-{i}") for i, p in enumerate(paths)]


def _captioned(run: RunInfo) -> str | None:
    return run.setting("instance_prompt")


def instance_records(run: RunInfo) -> list[ImageRecord]:
    """The images the run was trained on, with the captions training gave them."""
    folder = run.setting("instance_data_dir")
    caption_ext = run.setting("caption_extension", ".txt")
    try:
        if folder:
            return scan_image_folder(folder, _captioned(run), caption_ext, warn=lambda _: None,
                                     what=f"instance data folder of run {run.name}")
        if run.setting("dataset_name"):
            return load_hf_dataset_records(run.setting("dataset_name"), run.setting("dataset_config_name"),
                                           run.setting("image_column", "image"), run.setting("caption_column"),
                                           _captioned(run), run.setting("cache_dir"))
    except DataError as e:
        raise EvalInputError(str(e)) from None
    raise EvalInputError(f"run {run.name} names no instance images (instance_data_dir or dataset_name)")


def heldout_records(run: RunInfo, eval_data_dir: str | None) -> list[ImageRecord] | None:
    """--eval_data_dir (captions: same-name .txt files, else the run's instance prompt), else the hook's set."""
    source = eval_data_dir if eval_data_dir else heldout_images_for(run)
    if source is None:
        return None
    if not isinstance(source, (str, Path)):
        return list(source)
    try:
        return scan_image_folder(source, _captioned(run), run.setting("caption_extension", ".txt"),
                                 warn=lambda _: None, what="--eval_data_dir folder")
    except DataError as e:
        raise EvalInputError(str(e)) from None


def generalization(instance_loss: float, heldout_loss: float | None) -> dict:
    return {
        "instance": instance_loss,
        "heldout": heldout_loss,
        "gap": None if heldout_loss is None else heldout_loss - instance_loss,
    }
