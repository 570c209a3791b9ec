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


def train_side_by_side(context, runs, settings: list[dict], quiet_log: Path) -> None:
    """Both runs at once, each in its own process on its own core (the demo's models use one thread each): on
    two cores the demo takes little more than one run instead of two. The second run's console goes to
    `quiet_log` so that one progress bar is shown; an error in either comes back here and is raised."""
    from concurrent.futures import ProcessPoolExecutor

    (label, path, _), (other, other_path, _) = runs
    print(f"== training {label} -> {path}, and {other} -> {other_path} beside it (its console: {quiet_log})",
          file=sys.stderr)
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        jobs = [pool.submit(train_in_this_process, settings[0], None),
                pool.submit(train_in_this_process, settings[1], str(quiet_log))]
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
