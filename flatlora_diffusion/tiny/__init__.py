"""Tiny, offline Stable Diffusion 1.x / SDXL pipelines, a CLIP tokenizer and a synthetic subject.

Nothing here touches the network. The demo, the ``make-tiny-model`` command and the tests use these
parts in place of the real models: they are real diffusers pipelines (same classes, same folder layout,
same loading code paths) whose weights are random and whose sizes are tiny, so a training step or a
2-step generation at 64 px takes a fraction of a second on one CPU core.

    tokenizer.py    build_clip_tokenizer: a real CLIP tokenizer, BPE merges learned on a built-in corpus
    pipelines.py    make_tiny_pipeline: tiny random SD 1.x / SDXL pipeline folders
    subject.py      make_subject_images: photos of one recognisable subject
    single_file.py  save_single_file_checkpoint: a pipeline as one file in the original SD key layout

Public API:
    ARCHES
    build_clip_tokenizer(out_dir) -> CLIPTokenizer
    make_tiny_pipeline(out_dir, arch="sd15", seed=0) -> Path
    make_subject_images(out_dir, n=4, size=64, seed=0, sizes=None) -> list[Path]
    save_single_file_checkpoint(pipeline_dir, out_file) -> Path
"""

from .pipelines import ARCHES, make_tiny_pipeline
from .single_file import ldm_state_dict, save_single_file_checkpoint
from .subject import make_subject_images
from .tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, build_clip_tokenizer

__all__ = ["ARCHES", "BOS_TOKEN", "EOS_TOKEN", "MODEL_MAX_LENGTH", "build_clip_tokenizer", "ldm_state_dict",
           "make_subject_images", "make_tiny_pipeline", "save_single_file_checkpoint"]
