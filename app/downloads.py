"""LoRA files offered for download under names that say whose and which they are.

In a run folder the files keep the names of the run-directory contract: every run's diffusers file is
pytorch_lora_weights.safetensors, and so is every checkpoint's. Downloaded from two runs, they would land in
the browser's folder under one name. So the app offers each file through a link named after the run, the
format and, for a step's LoRA, the step, in <runs>/.downloads/<run>/ (a hidden folder, never listed as a run):
the run folder is not touched, a symbolic link costs no space and follows the file when the trainer replaces
it, and Gradio serves (copies into its cache) the file under the link's name.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from .runs import Run

DOWNLOADS = ".downloads"


def download_name(run_name: str, fmt: str, step: int | None = None) -> str:
    """myrun-flat_kohya.safetensors; myrun-flat_step120_diffusers.safetensors for the LoRA of step 120."""
    return f"{run_name}_{'' if step is None else f'step{int(step)}_'}{fmt}.safetensors"


def offer(run: Run, source: Path, name: str) -> Path:
    """A path called `name` whose content is `source` (a link; a copy where links cannot be made)."""
    folder = run.path.parent / DOWNLOADS / run.name
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / name
    # made under a temporary name and renamed into place: two pages offering the same file never see half of it
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(Path(source).resolve(), tmp)
    except OSError:  # a file system without symbolic links
        shutil.copyfile(source, tmp)
    os.replace(tmp, link)
    return link


def final_files(run: Run) -> list[Path]:
    """The run's finished LoRA files (kohya, diffusers), offered as <run>_<format>.safetensors."""
    return [offer(run, path, download_name(run.name, fmt)) for fmt, path in run.exports().items() if path]


def step_files(runs: list[Run], steps: list[int | None]) -> tuple[list[Path], str]:
    """(files, note): each run's LoRA of its step (the step its grid column shows), offered as
    <run>_step<N>_<format>.safetensors, and one line per run that has none at that step."""
    files, missing, untrained = [], [], []
    for run, step in zip(runs, steps):
        if step is None:
            continue
        if step == 0:
            untrained.append(run.name)
            continue
        saved = run.lora_steps()
        if step in saved:
            files += [offer(run, path, download_name(run.name, fmt, step)) for fmt, path in saved[step].items()]
        else:
            kept = ", ".join(str(s) for s in saved) or "none yet"
            missing.append(f"{run.name}: no LoRA file of step {step} (LoRA files at steps: {kept})")
    if missing:
        missing.append("Each checkpoint keeps the LoRA of its step: with Checkpoint every N steps equal to "
                       "Validate every N steps, every validation step has one.")
    if untrained:
        missing.append(f"{', '.join(untrained)}: step 0 is the base model before any training, there is no LoRA "
                       f"to download")
    return files, "  \n".join(missing)


def prune(runs_dir: Path) -> None:
    """Links of runs that were deleted or renamed, and links whose file is gone (a checkpoint rotated out)."""
    root = Path(runs_dir) / DOWNLOADS
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if not (Path(runs_dir) / folder.name).is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for link in folder.iterdir():
            if link.is_symlink() and not link.exists():
                link.unlink(missing_ok=True)


__all__ = ["DOWNLOADS", "download_name", "offer", "final_files", "step_files", "prune"]
