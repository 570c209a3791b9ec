"""Deleting and renaming run folders, and their size on disk: the Runs tab's housekeeping.

A run that trains or waits in the queue is never touched: its trainer (or the launcher, when its turn comes)
writes into the folder by its path. Deleting first renames the folder to a hidden name, so the run leaves the
list at once and a half-deleted folder is never shown as a run; renaming moves the folder and rewrites the
paths inside config.yaml, so that the run can still be resumed or repeated from its new place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import yaml

from flatlora_diffusion.run_dir import lock_holder

from .runs import ACTIVE, Run, get_run, safe_name


class RunBusy(ValueError):
    """The run trains or waits: the message says what to do, in one line."""


def check_idle(run: Run, queued_or_running: bool) -> None:
    """Refuse a run that trains or waits (the launcher's view, its status, or a trainer holding its lock)."""
    state = run.state
    if queued_or_running or state in ACTIVE or lock_holder(run.path) is not None:
        shown = state if state in ACTIVE else "training"
        raise RunBusy(f"{run.name} is {shown}: cancel it first (a run is never deleted or renamed while it "
                      f"trains or waits)")


def delete_run(runs_dir: str | os.PathLike, name: str, queued_or_running: bool = False) -> str:
    """Delete a finished run folder and everything in it. Raises KeyError (no such run) or RunBusy."""
    run = get_run(runs_dir, name)
    check_idle(run, queued_or_running)
    hidden = run.path.with_name(f".deleting-{name}-{secrets.token_hex(4)}")
    os.rename(run.path, hidden)  # out of the list in one step; the files go afterwards
    shutil.rmtree(hidden, ignore_errors=True)
    return f"Deleted {name}."


def rename_run(runs_dir: str | os.PathLike, name: str, new_name: str, queued_or_running: bool = False) -> str:
    """Rename a finished run folder; paths inside it in config.yaml follow. Returns the new name.
    Raises KeyError, RunBusy, or ValueError (a bad or taken name)."""
    run = get_run(runs_dir, name)
    clean = safe_name(new_name, default="")
    if not clean:
        raise ValueError("give the new name (letters, digits, '.', '_' and '-')")
    if clean == name:
        raise ValueError(f"{name} already has that name")
    target = run.path.with_name(clean)
    if target.exists():
        raise ValueError(f"{clean} exists already; pick another name")
    check_idle(run, queued_or_running)
    os.rename(run.path, target)
    _move_config_paths(target, run.path)
    return clean


def _move_config_paths(folder: Path, old: Path) -> None:
    """Settings that point into the old folder (output_dir, uploaded images, generated class images) point
    into the new one."""
    path = folder / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(data, dict):
        return
    old_text = str(old)
    for key, value in data.items():
        if isinstance(value, str) and (value == old_text or value.startswith(old_text + os.sep)):
            data[key] = str(folder) + value[len(old_text):]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the trainer's leftover sweep removes a torn one
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def disk_usage(path: Path) -> int:
    """Bytes in the files under `path` (what deleting the run frees, roughly); files vanishing meanwhile count 0."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += disk_usage(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - the loop returns at GB


__all__ = ["RunBusy", "check_idle", "delete_run", "rename_run", "disk_usage", "format_size"]
