"""The demo's two runs side by side on a CPU, one process per core, started from a fork server that has imported
the trainer already (demo.py decides when; this module only runs them)."""

from __future__ import annotations

import sys
from pathlib import Path

# What a run's process imports before its first step (about 5 s of a demo's minute on one core): a fork server
# imports it once, while this process is still starting, and both runs are forked from it ready to go.
_WORKER_PRELOAD = ["flatlora_diffusion.train", "flatlora_diffusion.trainer.trainer",
                   "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "peft"]


def start_worker_server():
    """The multiprocessing context the runs start from: a fork server, started now so that it imports
    _WORKER_PRELOAD on the second core while this process imports torch and renders the data. (A fork server, not
    a fork of this process: it forks from a single-threaded process that has run no torch work.)"""
    import multiprocessing
    import os
    from multiprocessing import forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: each run imports on its own
        return multiprocessing.get_context("spawn")
    # Started before this process knows whether torch sees a GPU (it would have to import torch first): with one,
    # the runs go one after the other in this process and the server just waits until the demo ends.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WORKER_PRELOAD)
    # The server imports before any of our logging setup runs: its environment keeps transformers' import-time
    # notes (a missing torchvision) off the console, as setup_logging does for the runs.
    saved = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = saved
    return context


# The base model's pictures yield to the two runs: they fill the gaps the runs leave (on two cores the demo took
# 54 s by its own clock, against 56 s without, one run each, 2026-12-07).
_YIELDING = 5


def _lower_priority(niceness: int) -> None:
    import os

    if niceness and hasattr(os, "nice"):
        os.nice(niceness)


def train_side_by_side(context, runs, settings: list[dict], quiet_log: Path, base_pictures: Path) -> None:
    """Both runs at once, each in its own process on its own core (the demo's models use one thread each), and
    the base model's validation pictures in a third process beside them (draw_base_model_pictures, into
    `base_pictures`): on two cores the demo takes about half the work of the three instead of the longest run
    with the pictures in it. The second run's console goes to `quiet_log` so that one progress bar is shown; an
    error in any of them comes back here and is raised."""
    from concurrent.futures import ProcessPoolExecutor

    (label, path, _), (other, other_path, _) = runs
    print(f"== training {label} -> {path}, and {other} -> {other_path} beside it (its console: {quiet_log})",
          file=sys.stderr)
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        jobs = [pool.submit(train_in_this_process, settings[0], None),
                pool.submit(train_in_this_process, settings[1], str(quiet_log)),
                pool.submit(draw_base_model_pictures, settings[0], str(base_pictures), _YIELDING)]
        for job in jobs:
            job.result()


def train_in_this_process(settings: dict, console_file: str | None) -> None:
    """One demo run in a process of its own (started by train_side_by_side)."""
    import torch

    if console_file is not None:
        sys.stderr = open(console_file, "w", buffering=1)  # the console of this process until it ends
    torch.set_num_threads(1)
    from .config import make_config
    from .console import setup_logging
    from .train import train

    setup_logging()
    train(make_config(settings))


def draw_base_model_pictures(settings: dict, folder: str, niceness: int = 0) -> None:
    """The step-0 validation pictures of a run with `settings`, made without that run: the base model's pictures
    (at step 0 the trainer's LoRA adds exactly zero) from the same models, sampler and code as the trainer's
    validation (trainer/setup.py, trainer/images.py), into `folder` as <prompt index>_<seed>.png. The demo's runs
    train the text encoder, so the trainer, too, hands the pipeline the prompts themselves (not cached embeddings).
    tests/test_demo.py checks that they are the pixels the trainer itself draws at step 0."""
    import torch

    _lower_priority(niceness)
    torch.set_num_threads(1)
    from .config import make_config
    from .data.class_images import FAST_PNG
    from .models import inspect_model_source
    from .trainer.images import sampling_pipeline, validation_images
    from .trainer.setup import load_run_components

    cfg = make_config(settings)
    components = load_run_components(cfg, inspect_model_source(cfg.pretrained_model_name_or_path, cfg.revision,
                                                                cfg.cache_dir))
    for model in [components.unet, components.vae, *components.text_encoders]:
        model.eval()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for p, seed, image in validation_images(sampling_pipeline(components), cfg):
            image.save(out / f"{p}_{seed}.png", **FAST_PNG)
