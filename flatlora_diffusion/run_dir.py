"""The run directory: the contract between training, the web app, export and comparison.

    <output_dir>/config.yaml            resolved TrainConfig (train --config config.yaml repeats the run)
    <output_dir>/status.json           state, step, total, message, times, ETA, pid (written atomically)
    <output_dir>/metrics.jsonl         one JSON object per optimizer step
    <output_dir>/samples/step_<NNNNNN>/<p>_<seed>.png, samples/prompts.json
    <output_dir>/checkpoints/checkpoint-<N>/
    <output_dir>/pytorch_lora_weights.safetensors   diffusers format
    <output_dir>/<output_name>.safetensors          kohya format (ComfyUI / AUTOMATIC1111)
    <output_dir>/trainer.lock          held (flock) by the one trainer of this folder while it runs; holds its pid
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "completed", "failed", "cancelled")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "config.yaml"
LOCK_FILE = "trainer.lock"
# What a run leaves in its folder, for --overwrite to clear (the app's own files and the images stay).
RUN_FILES = (CONFIG_FILE, "status.json", "metrics.jsonl", DIFFUSERS_WEIGHTS)
RUN_FOLDERS = ("samples", "checkpoints", "logs")


def write_json_atomic(path: Path, data: Any, in_place_fallback: bool = False) -> None:
    """Write `path` whole or not at all (a temporary file moved into place).

    With in_place_fallback, when the temporary file cannot be written (a full disk), the existing file is
    overwritten in place instead: a small file rewritten within its own block needs no new space, so a
    full disk can still record that the run failed. A crash during that rewrite can tear the file (readers
    tolerate that); a stale "running" is what the fallback prevents."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(data, indent=1)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not in_place_fallback or not path.exists():
            raise
        compact = json.dumps(data, separators=(",", ":")).encode()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, compact)
            os.ftruncate(fd, len(compact))
        finally:
            os.close(fd)


class RunLocked(Exception):
    """Another live process holds the run folder's trainer lock."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path} is being trained by {who}; one run folder has at most one trainer")


class TrainerLock:
    """flock on <run>/trainer.lock, held for the trainer's lifetime; the kernel drops it when the process dies
    (even by SIGKILL), so "locked" always means "a trainer is alive in this folder"."""

    def __init__(self, run_path: Path):
        self.path = Path(run_path) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, wait_s: float = 2.0) -> "TrainerLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s  # a reader's brief probe (lock_holder) must not make us fail
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = _read_pid(self.path)
                    os.close(fd)
                    raise RunLocked(self.path.parent, pid) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        # A forked child (a dataloader worker) would share the lock and keep it after the trainer died:
        # children drop their copy of the descriptor, so the lock lives exactly as long as the trainer.
        os.register_at_fork(after_in_child=self._drop_in_child)
        return self

    def _drop_in_child(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holder(run_path: str | os.PathLike) -> int | None:
    """The pid of the live trainer holding the run folder's lock; 0 when held by a process whose pid is not
    written yet; None when no trainer holds it. Creates nothing."""
    path = Path(run_path) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(path) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.status_file = self.path / "status.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.samples = self.path / "samples"
        self.checkpoints = self.path / "checkpoints"
        self._status: dict[str, Any] = {}

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def holds_a_run(self) -> bool:
        """Anything a trainer or the app writes is there (an empty or foreign folder holds no run)."""
        return any((self.path / name).exists() for name in RUN_FILES) or bool(self.list_checkpoints())

    def has_progress(self) -> bool:
        """Any trained step on record: a metrics line, a checkpoint, a LoRA file, or a finished state."""
        return (bool(self.read_metrics()) or bool(self.list_checkpoints()) or (self.path / DIFFUSERS_WEIGHTS).exists()
                or self.read_status().get("state") == "completed")

    def clear_run_files(self) -> None:
        """--overwrite: remove the previous run's record (only the files of the run-directory contract)."""
        for name in RUN_FILES:
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
        for name in RUN_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for p in self.path.glob("*.safetensors"):
            p.unlink()
        self._status = {}

    def remove_leftovers(self) -> None:
        """Temporary files of an interrupted writer (call while holding the trainer lock): half-written
        checkpoints and sample folders, checkpoints being deleted, temporary JSON and safetensors files."""
        for folder, patterns in ((self.checkpoints, ("*.partial", ".*.deleting")), (self.samples, ("*.partial",)),
                                 (self.path, (".*.tmp",)), (self.samples, (".*.tmp",))):
            if not folder.is_dir():
                continue
            for pattern in patterns:
                for p in folder.glob(pattern):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        try:
                            p.unlink()
                        except OSError:
                            pass

    # --- status ---------------------------------------------------------------------------------------------
    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def set_status(self, state: str | None = None, **fields: Any) -> None:
        if not self._status:
            self._status = self.read_status() or {"state": "queued", "step": 0, "total": 0, "message": ""}
        if state is not None:
            assert state in STATES, state
            self._status["state"] = state
            if state == "running" and not self._status.get("started_at"):
                self._status["started_at"] = time.time()
            if state in ("completed", "failed", "cancelled"):
                self._status["finished_at"] = time.time()
        self._status.update(fields, updated_at=time.time(), pid=os.getpid())
        write_json_atomic(self.status_file, self._status, in_place_fallback=state in ("failed", "cancelled"))

    # --- metrics and samples --------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with self.metrics_file.open("a+b") as f:
            if f.tell() > 0:  # a torn last line (a failed append) must not swallow this record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records; a torn or foreign line (a failed append) is skipped, never an error."""
        try:
            text = self.metrics_file.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        return out

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, keep one record per step up to `step` (the resumed run does the later ones again);
        torn lines go."""
        if not self.metrics_file.exists():
            return
        kept: dict[int, dict] = {}
        for record in self.read_metrics():
            if record["step"] <= step:
                kept.setdefault(record["step"], record)
        tmp = self.metrics_file.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(kept[s]) + "\n" for s in sorted(kept)))
        os.replace(tmp, self.metrics_file)

    def sample_dir(self, step: int) -> Path:
        return self.samples / f"step_{step:06d}"

    def write_prompts(self, prompts: list[str]) -> None:
        self.samples.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.samples / "prompts.json", {str(i): p for i, p in enumerate(prompts)})

    # --- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Published checkpoints, oldest first (a checkpoint is published by renaming its finished folder)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit():
                if (p / "training_state.json").exists():  # complete checkpoints only
                    found.append((int(p.name.split("-", 1)[1]), p))
        return sorted(found)

    def delete_checkpoint(self, path: Path, between=None) -> None:
        """Unpublish first (one rename), then delete: a crash midway never leaves a half-deleted checkpoint
        that still looks complete. `between` runs after the rename (fault injection)."""
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        if between is not None:
            between()
        shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why a published checkpoint cannot be resumed from (None: it looks whole). Reads headers and sizes only."""
    try:
        state = json.loads((path / "training_state.json").read_text())
        step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable training_state.json ({getattr(e, 'strerror', None) or type(e).__name__})"
    if not isinstance(step, int):
        return "training_state.json has no step"
    for name, size in (state.get("files") or {}).items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    from .safetensors_io import SafetensorsFormatError, read_header

    loras = sorted(path.glob("lora_*.safetensors"))
    if not loras:
        return "it holds no LoRA weights"
    for p in loras:
        try:
            read_header(p)
        except (OSError, SafetensorsFormatError) as e:
            return str(e) if isinstance(e, SafetensorsFormatError) else f"{p.name}: {e.strerror or e}"
    return None


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
