"""One training at a time: a queue of run folders, the trainer as a child process, and cancel.

The child is `flatlora-diffusion train --config <run>/config.yaml`, started in a session of its own so
that cancel can signal its whole process tree (dataloader workers, accelerate's helpers) at once, and
so that it survives the app: the app can be restarted while a run trains, and the new app adopts the
running process (by the pid in status.json) and re-queues the runs that were still waiting.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .runs import LOG_FILE, TERMINAL, Run, get_run, list_runs, pid_alive

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
ADOPTED_GONE = -1000  # exit "code" of an adopted process: not our child, its real code is unknowable


def default_trainer_command() -> list[str]:
    """The installed `flatlora-diffusion` script next to this Python, else the CLI module through it."""
    script = Path(sys.executable).parent / "flatlora-diffusion"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flatlora_diffusion.cli import main; sys.exit(main(sys.argv[1:]))"]


class _Job:
    def __init__(self, run: Run, pid: int, proc: subprocess.Popen | None):
        self.run = run
        self.pid = pid  # also the process group id: the child leads a session of its own
        self.proc = proc  # None for a process adopted from an earlier app
        self.cancel_requested = False

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return None if pid_alive(self.pid) else ADOPTED_GONE


class Launcher:
    """Runs queued run folders one after the other. Thread-safe; the UI calls submit/cancel/snapshot."""

    def __init__(self, runs_dir, trainer_command: list[str] | None = None, kill_grace_s: float = 15.0,
                 poll_s: float = 0.25, env: dict[str, str] | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.trainer_command = list(trainer_command or default_trainer_command())
        self.kill_grace_s = kill_grace_s
        self.poll_s = poll_s
        self.extra_env = dict(env or {})
        self._queue: list[str] = []
        self._job: _Job | None = None
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> "Launcher":
        """Adopt a run still training from an earlier app, re-queue waiting runs, start the worker."""
        if self._thread is not None:
            return self
        adopted = None
        waiting = []
        for run in sorted(list_runs(self.runs_dir), key=lambda r: r.created_at()):
            status = run.status()
            state = status.get("state")
            if state == "running":
                pid = status.get("pid")
                if adopted is None and isinstance(pid, int) and pid_alive(pid):
                    adopted = _Job(run, pid, None)
                else:
                    run.update_status(state="failed", eta_seconds=None,
                                      message="the training process is gone (the app or the machine stopped)")
            elif state == "queued":
                waiting.append(run.name)
        with self._lock:
            self._job = adopted
            self._queue = waiting + [n for n in self._queue if n not in waiting]
        self._thread = threading.Thread(target=self._work, name="flatlora-launcher", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, cancel_running: bool = False, timeout: float = 30.0) -> None:
        """Stop the worker. The running training keeps going unless cancel_running (runs outlive the app)."""
        if cancel_running:
            job = self._job
            if job is not None:
                self.cancel(job.run.name)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- queries --------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return {"running": self._job.run.name if self._job else None, "queued": list(self._queue)}

    def position(self, name: str) -> int | None:
        """0 = training now, 1 = next, ...; None when neither running nor waiting."""
        with self._lock:
            if self._job is not None and self._job.run.name == name:
                return 0
            if name in self._queue:
                return self._queue.index(name) + 1
        return None

    # --- actions --------------------------------------------------------------------------------------
    def submit(self, names: list[str]) -> None:
        for name in names:
            get_run(self.runs_dir, name)  # refuse unknown names early
        with self._lock:
            for name in names:
                if name not in self._queue and not (self._job and self._job.run.name == name):
                    self._queue.append(name)
            self._lock.notify_all()

    def cancel(self, name: str) -> str:
        """Cancel a waiting or running run; returns what happened, in words."""
        run = get_run(self.runs_dir, name)
        with self._lock:
            if name in self._queue:
                self._queue.remove(name)
                run.update_status(state="cancelled", message="cancelled before it started", eta_seconds=None)
                return f"{name}: removed from the queue"
            job = self._job if self._job and self._job.run.name == name else None
            if job is not None:
                job.cancel_requested = True
        if job is None:
            state = run.state
            if state in TERMINAL:
                return f"{name}: already {state}"
            if state in ("queued", "running"):  # not ours (another app, or the worker lost it): mark it
                pid = run.status().get("pid")
                if state == "running" and isinstance(pid, int) and pid_alive(pid):
                    _kill_tree(pid, signal.SIGTERM, lone_process=True)
                run.update_status(state="cancelled", message="cancelled", eta_seconds=None)
                return f"{name}: cancelled"
            return f"{name}: not running"
        _kill_tree(job.pid, signal.SIGTERM, lone_process=job.proc is None)  # the trainer marks it cancelled
        threading.Thread(target=self._kill_later, args=(job,), daemon=True).start()
        return f"{name}: stopping"

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing runs or waits (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if snap["running"] is None and not snap["queued"]:
                return True
            time.sleep(0.1)
        return False

    # --- the worker -----------------------------------------------------------------------------------
    def _kill_later(self, job: _Job) -> None:
        deadline = time.monotonic() + self.kill_grace_s
        while time.monotonic() < deadline:
            if job.poll() is not None:
                break
            time.sleep(0.1)
        # whatever is left of the tree, the leader too if it lingers
        _kill_tree(job.pid, signal.SIGKILL, lone_process=job.proc is None and job.poll() is None)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self._job is None and not self._queue:
                    self._lock.wait()
                if self._stop:
                    return
                if self._job is None:
                    name = self._queue.pop(0)
                    try:
                        run = get_run(self.runs_dir, name)
                    except KeyError:
                        continue
                    if run.state != "queued":
                        continue  # cancelled, or finished by someone else meanwhile
                    try:
                        self._job = self._launch(run)
                    except Exception as e:  # a broken trainer command must not kill the worker
                        log.exception("cannot start %s", name)
                        run.update_status(state="failed", message=f"could not start the trainer: {e}")
                        continue
                job = self._job
            self._follow(job)
            with self._lock:
                self._job = None
                self._lock.notify_all()

    def _launch(self, run: Run) -> _Job:
        env = os.environ.copy()
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        # the child imports this very checkout of flatlora_diffusion, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        command = [*self.trainer_command, "train", "--config", str(run.path / "config.yaml")]
        with (run.path / LOG_FILE).open("ab") as logf:
            logf.write(f"[app] {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(command, cwd=run.path, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        run.update_status(pid=proc.pid)  # until the trainer writes its own
        return _Job(run, proc.pid, proc)

    def _follow(self, job: _Job) -> None:
        while True:
            code = job.poll()
            if code is not None:
                break
            if self._stop:
                return  # the app is going away: leave the training running for the next app to adopt
            if job.proc is not None:
                try:
                    job.proc.wait(timeout=self.poll_s)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(self.poll_s)
        _kill_tree(job.pid, signal.SIGKILL)  # leftovers of the tree (workers whose parent died)
        self._finish(job, code)

    def _finish(self, job: _Job, code: int) -> None:
        run = job.run
        status = run.status()
        with (run.path / LOG_FILE).open("ab") as logf:
            what = "the adopted trainer process ended" if code == ADOPTED_GONE else f"trainer exited with code {code}"
            logf.write(f"\n[app] {what}\n".encode())
        if status.get("state") in TERMINAL:
            if job.cancel_requested and status.get("state") != "cancelled" and code != 0:
                run.update_status(state="cancelled", message="cancelled", eta_seconds=None)
            return
        if job.cancel_requested:
            run.update_status(state="cancelled", message="cancelled", eta_seconds=None)
        elif code == ADOPTED_GONE:
            run.update_status(state="failed", eta_seconds=None,
                              message="the training process ended without a final status")
        elif code == 0:
            run.update_status(state="failed", eta_seconds=None,
                              message="the trainer exited without marking the run finished")
        else:
            run.update_status(state="failed", eta_seconds=None, message=_last_error(run, code))


def _kill_tree(pgid: int, sig: int, lone_process: bool = False) -> None:
    """Signal the process group `pgid` (our children lead one). With lone_process, a live process that leads
    no group (a training adopted from a terminal) is signalled on its own."""
    try:
        os.killpg(pgid, sig)
        return
    except PermissionError:
        return
    except ProcessLookupError:
        pass
    if lone_process and pid_alive(pgid):
        try:
            os.kill(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _last_error(run: Run, code: int) -> str:
    """The trainer's last words (its one-line error), for the run's status message."""
    lines = [ln for ln in run.log_tail(30).splitlines() if ln.strip() and not ln.startswith("[app]")]
    why = f"signal {-code}" if code < 0 else f"exit code {code}"
    return f"the trainer stopped ({why}): {lines[-1].strip()[:300]}" if lines else f"the trainer stopped ({why})"
