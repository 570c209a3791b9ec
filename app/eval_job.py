"""One evaluation as a child process: `flatlora-diffusion evaluate <run>`, its log and its own status file.

The launcher decides when (one job at a time, trainings and evaluations in one first-come queue); this module
knows how: the command, where its output goes, and how its end is recorded in <run>/eval_status.json.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from flatlora_diffusion.run_dir import DIFFUSERS_WEIGHTS

from .evaluations import EVAL_LOG_FILE, write_eval_status
from .runs import Run


class EvaluationRefused(ValueError):
    """The run cannot be evaluated (yet): one line for the user."""


def check_evaluable(run: Run) -> None:
    if run.state != "completed":
        raise EvaluationRefused(f"{run.name} is {run.state}; only a finished run can be evaluated")
    if not (run.path / DIFFUSERS_WEIGHTS).is_file():
        raise EvaluationRefused(f"{run.name} has no LoRA file {DIFFUSERS_WEIGHTS}")


def launch(run: Run, command_prefix: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the evaluation in a session of its own (so cancel can signal its whole tree)."""
    command = [*command_prefix, "evaluate", str(run.path)]
    with (run.path / EVAL_LOG_FILE).open("ab") as logf:
        logf.write(f"[app] {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(command, cwd=run.path, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    write_eval_status(run, state="running", pid=proc.pid, started_at=time.time(), finished_at=None, message="")
    return proc


def _last_line(log_file: Path) -> str:
    try:
        with log_file.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("[app]")]
    return lines[-1][:300] if lines else ""


def finish(run: Run, code: int | None, cancelled: bool) -> dict:
    """Record how the evaluation ended: completed (eval.json written by the child), cancelled, or failed with
    the child's last words (its one-line `error: ...`)."""
    if not run.path.is_dir():
        return {}
    if cancelled:
        return write_eval_status(run, state="cancelled", finished_at=time.time(), message="cancelled")
    if code == 0:
        return write_eval_status(run, state="completed", finished_at=time.time(), message="")
    why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    last = _last_line(run.path / EVAL_LOG_FILE)
    return write_eval_status(run, state="failed", finished_at=time.time(),
                             message=f"the evaluation stopped ({why})" + (f": {last}" if last else ""))
