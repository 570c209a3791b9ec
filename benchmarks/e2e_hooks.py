"""Timing a training process from outside it, without editing its code (diffusers' script or ours).

hooked_env() writes HOOKS as DIR/hooks/sitecustomize.py and returns an environment with that folder first on
PYTHONPATH, so that Python runs it at the start of the training process; it notes one time.perf_counter() per
optimizer step (torch's global optimizer step post-hook, after torch.cuda.synchronize() if asked) and one JSON
event per diffusers pipeline denoising loop and per validation round of ours, into files read_floats() and
read_events() read back. The hook file is self-contained on purpose: it runs inside the trainer, whose PYTHONPATH
holds DIR/hooks, the repository and the caller's PYTHONPATH but not benchmarks/, so it imports nothing from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A sitecustomize.py written into DIR/hooks and put first on PYTHONPATH of one trainer process: timestamps read
# from outside the trainer, without editing diffusers' script.
HOOKS = '''"""Written by benchmarks/trainer_end_to_end.py; first on PYTHONPATH of one training process.

E2E_STEP_TIMES=FILE: one time.perf_counter() per optimizer step (torch's global optimizer step post-hook), after
torch.cuda.synchronize() when E2E_STEP_SYNC=1. E2E_EVENTS=FILE: one JSON line per diffusers pipeline denoising
loop ("denoise": host start and end, steps, the serial number of the pipeline object: a new one per validation
round in both trainers) and per flatlora-diffusion validation round ("validation"). Then the sitecustomize this
one shadows, if any, runs.
"""
import importlib.abc
import itertools
import json
import os
import sys
import time

_STEPS, _EVENTS = os.environ.get("E2E_STEP_TIMES"), os.environ.get("E2E_EVENTS")
_SYNC = os.environ.get("E2E_STEP_SYNC") == "1"


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls patch(module) right after the named module has run, wherever it is first imported from."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
        else:
            return None
        patch, run = self.patches.pop(name), spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _optimizer(mod):
    import torch

    def after_step(optimizer, args, kwargs):
        if _SYNC and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        _append(_STEPS, repr(time.perf_counter()))

    mod.register_optimizer_step_post_hook(after_step)


class _Timed:
    """A pipeline's progress bar (context manager or iterable) that notes when its loop starts and ends."""

    def __init__(self, bar, steps, pipeline, images):
        self.bar, self.steps, self.pipeline, self.images = bar, steps, pipeline, images
        self.start = time.perf_counter()

    def _done(self):
        _append(_EVENTS, json.dumps({"event": "denoise", "start": self.start, "end": time.perf_counter(),
                                     "steps": self.steps, "pipeline": self.pipeline, "images": self.images}))

    def __enter__(self):
        return self.bar.__enter__()

    def __exit__(self, *exc):
        self._done()
        return self.bar.__exit__(*exc)

    def __iter__(self):
        yield from self.bar
        self._done()

    def __getattr__(self, name):
        return getattr(self.bar, name)


_serials = itertools.count()


def _pipeline_utils(mod):
    original = mod.DiffusionPipeline.progress_bar

    def progress_bar(self, iterable=None, total=None):
        steps = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
        if "_e2e_serial" not in self.__dict__:
            object.__setattr__(self, "_e2e_serial", next(_serials))
        # The images of this call: the calling __call__'s batch_size (prompts) x num_images_per_prompt.
        caller = sys._getframe(1).f_locals
        images = (caller.get("batch_size") or 1) * (caller.get("num_images_per_prompt") or 1)
        return _Timed(original(self, iterable=iterable, total=total), steps, self._e2e_serial, images)

    mod.DiffusionPipeline.progress_bar = progress_bar


def _trainer_images(mod):
    cls = getattr(mod, "ImagesMixin", None)
    original = getattr(cls, "_make_validation_images", None)
    if original is None:
        return

    def make_validation_images(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _append(_EVENTS, json.dumps({"event": "validation", "start": start, "end": time.perf_counter(),
                                         "step": self.global_step}))

    cls._make_validation_images = make_validation_images


_patches = {}
if _STEPS:
    _patches["torch.optim.optimizer"] = _optimizer
if _EVENTS:
    _patches["diffusers.pipelines.pipeline_utils"] = _pipeline_utils
    _patches["flatlora_diffusion.trainer.images"] = _trainer_images
if _patches:
    sys.meta_path.insert(0, _AfterImport(_patches))

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _file = os.path.join(_entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(os.path.dirname(_file)) != _here and os.path.isfile(_file):
        with open(_file) as _f:
            exec(compile(_f.read(), _file, "exec"), {"__name__": "sitecustomize", "__file__": _file})
        break
'''


def hooked_env(args, out: Path, sync: bool) -> tuple[dict, Path, Path]:
    """The environment of a hooked run, and the (emptied) files its step times and events go to."""
    hooks = Path(args.out) / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    times, events = out.with_name(out.name + ".steps"), out.with_name(out.name + ".events")
    for f in (times, events):
        f.unlink(missing_ok=True)
    path = os.pathsep.join(filter(None, [str(hooks), str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, E2E_STEP_TIMES=str(times), E2E_EVENTS=str(events),
               E2E_STEP_SYNC="1" if sync else "0")
    return env, times, events


def read_floats(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
