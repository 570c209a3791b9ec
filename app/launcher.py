"""One training at a time: a queue of run folders, the trainer as a child process, and cancel.

The child is `flatlora-diffusion train --config <run>/config.yaml`, started in a session of its own so
that cancel can signal its whole process tree (dataloader workers, accelerate's helpers) at once, and
so that it survives the app: the app can be restarted while a run trains, and the new app adopts the
running process and re-queues the runs that were still waiting.

A process is adopted (and ever signalled) only when it is provably the trainer of that run: it holds the run
folder's trainer lock (flatlora_diffusion.run_dir.TrainerLock, taken before the trainer writes anything), or,
in the seconds before it takes the lock, its command line is `... train --config <run>/config.yaml`. A pid in a
stale status.json that now belongs to some other process is never adopted, nor killed by Cancel.
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

from flatlora_diffusion.run_dir import lock_holder

from . import eval_job
from .evaluations import eval_status, write_eval_status
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


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _runs_this_config(pid: int, run: Run) -> bool:
    """The process's command line is `<trainer> train --config <run>/config.yaml` (how the app starts one)."""
    args = _command_line(pid)
    config = (run.path / "config.yaml").resolve()
    for i, arg in enumerate(args[:-1]):
        if arg == "--config" and "train" in args[:i]:
            try:
                return Path(args[i + 1]).resolve() == config
            except OSError:
                return False
    return False


def trainer_pid(run: Run, pid_hint: int | None = None) -> int | None:
    """The pid of the live trainer of `run`, proven (see the module docstring); None if there is none."""
    holder = lock_holder(run.path)
    if holder and pid_alive(holder):
        return holder
    if isinstance(pid_hint, int) and pid_hint > 0 and pid_alive(pid_hint) and _runs_this_config(pid_hint, run):
        return pid_hint
    if holder == 0:  # locked, the holder's pid not written yet (a fraction of a second)
        time.sleep(0.1)
        return lock_holder(run.path) or None
    return None


class _Job:
    def __init__(self, run: Run, pid: int, proc: subprocess.Popen | None):
        self.run = run
        self.pid = pid  # also the process group id: the child leads a session of its own
        self.proc = proc  # None for a process adopted from an earlier app
        self.cancel_requested = False

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return None if trainer_pid(self.run, self.pid) == self.pid else ADOPTED_GONE


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
        # evaluations (`flatlora-diffusion evaluate <run>`) share the one-job-at-a-time worker with trainings;
        # tickets keep the two waiting lists in one first-come order
        self._evals: list[str] = []
        self._evaluating: tuple[str, subprocess.Popen] | None = None
        self._eval_cancel = False
        self._tickets: dict[tuple[str, str], int] = {}
        self._next_ticket = 1
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
            try:
                status = run.status()
                state = status.get("state")
                if state not in ("running", "queued"):
                    continue
                # "queued" too: the app may have stopped between starting a trainer and its first status write
                pid = trainer_pid(run, status.get("pid"))
                if pid is not None:
                    if adopted is None:
                        adopted = _Job(run, pid, None)
                    else:  # a second live trainer (started by hand): it keeps its own status
                        log.warning("%s is being trained by pid %s outside this app's queue", run.name, pid)
                elif state == "running":
                    run.update_status(state="failed", eta_seconds=None,
                                      message="the training process is gone (the app or the machine stopped)")
                else:
                    waiting.append(run.name)
            except Exception:  # one unreadable run folder must not keep the app from starting
                log.exception("cannot take over %s", run.name)
        evals_waiting = _stale_evaluations(self.runs_dir)
        with self._lock:
            self._job = adopted
            self._queue = waiting + [n for n in self._queue if n not in waiting]
            self._evals = evals_waiting + [n for n in self._evals if n not in evals_waiting]
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

    def eval_snapshot(self) -> dict:
        """The evaluation running now (a run name or None) and those waiting, in order."""
        with self._lock:
            return {"evaluating": self._evaluating[0] if self._evaluating else None, "waiting": list(self._evals)}

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
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            log.error("the launcher's worker had stopped; starting it again")
            self._thread = threading.Thread(target=self._work, name="flatlora-launcher", daemon=True)
            self._thread.start()
        with self._lock:
            for name in names:
                if name not in self._queue and not (self._job and self._job.run.name == name):
                    self._queue.append(name)
                    self._take_ticket("train", name)
            self._lock.notify_all()

    def submit_evaluation(self, name: str) -> str:
        """Queue `flatlora-diffusion evaluate <run>` for a finished run; returns what happened, in words.
        Raises KeyError for an unknown run, eval_job.EvaluationRefused for one that cannot be evaluated."""
        run = get_run(self.runs_dir, name)
        eval_job.check_evaluable(run)
        with self._lock:
            if self._evaluating and self._evaluating[0] == name:
                return f"{name}: being evaluated now"
            if name in self._evals:
                return f"{name}: evaluation already waiting ({self._evals.index(name) + 1}.)"
            self._evals.append(name)
            self._take_ticket("evaluate", name)
            write_eval_status(run, state="queued", pid=None, queued_at=time.time(), finished_at=None,
                              message="waiting in the queue")
            self._lock.notify_all()
        return f"{name}: evaluation queued"

    def cancel_evaluation(self, name: str) -> str:
        run = get_run(self.runs_dir, name)
        with self._lock:
            if name in self._evals:
                self._evals.remove(name)
                write_eval_status(run, state="cancelled", message="cancelled before it started")
                return f"{name}: evaluation removed from the queue"
            if not (self._evaluating and self._evaluating[0] == name):
                return f"{name}: no evaluation waiting or running"
            self._eval_cancel = True
            proc = self._evaluating[1]
        _kill_tree(proc.pid, signal.SIGTERM)
        return f"{name}: stopping the evaluation"

    def _take_ticket(self, kind: str, name: str) -> None:
        self._tickets[(kind, name)] = self._next_ticket
        self._next_ticket += 1

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
                pid = trainer_pid(run, run.status().get("pid"))
                if pid is not None:  # only a process proven to be this run's trainer is signalled
                    _kill_tree(pid, signal.SIGTERM, lone_process=True)
                run.update_status(state="cancelled", message="cancelled", eta_seconds=None)
                return f"{name}: cancelled"
            return f"{name}: not running"
        if job.proc is None and trainer_pid(job.run, job.pid) != job.pid:
            return f"{name}: already stopped"  # the adopted trainer ended; its pid may be another process now
        _kill_tree(job.pid, signal.SIGTERM, lone_process=job.proc is None)  # the trainer marks it cancelled
        threading.Thread(target=self._kill_later, args=(job,), daemon=True).start()
        return f"{name}: stopping"

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing runs or waits (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap, evals = self.snapshot(), self.eval_snapshot()
            if snap["running"] is None and not snap["queued"] and evals["evaluating"] is None and not evals["waiting"]:
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
        # whatever is left of the tree, the leader too if it lingers (an adopted one only while still proven)
        _kill_tree(job.pid, signal.SIGKILL, lone_process=job.proc is None and job.poll() is None)

    def _work(self) -> None:
        """The worker thread: whatever one run does (its folder deleted, a full disk, a broken trainer
        command), the queue goes on."""
        while True:
            job = None
            try:
                if self._one_job():
                    return
            except Exception:
                log.exception("launcher: a run failed in the app; the queue goes on")
                with self._lock:
                    job, self._job = self._job, None
                    self._lock.notify_all()
                if job is not None:
                    try:
                        job.run.update_status(state="failed", eta_seconds=None,
                                              message="the app lost track of this run (see the app's log)")
                    except Exception:
                        pass
                time.sleep(self.poll_s)

    def _one_job(self) -> bool:
        """Start (or adopt) and follow one run. True when the launcher is stopping."""
        with self._lock:
            while not self._stop and self._job is None and not self._queue and not self._evals:
                self._lock.wait()
            if self._stop:
                return True
            if self._job is None and self._evals and (
                    not self._queue or self._tickets.get(("evaluate", self._evals[0]), 0)
                    < self._tickets.get(("train", self._queue[0]), 0)):
                name = self._evals.pop(0)
                self._tickets.pop(("evaluate", name), None)
                evaluate_now = name
            else:
                evaluate_now = None
        if evaluate_now is not None:
            return self._evaluate(evaluate_now)
        with self._lock:
            if self._job is None:
                if not self._queue:  # emptied by a cancel between the two locked sections
                    return False
                name = self._queue.pop(0)
                self._tickets.pop(("train", name), None)
                try:
                    run = get_run(self.runs_dir, name)
                except KeyError:
                    return False
                if run.state != "queued":
                    return False  # cancelled, or finished by someone else meanwhile
                pid = trainer_pid(run)
                if pid is not None:  # a trainer already works on it (one run folder, at most one trainer)
                    self._job = _Job(run, pid, None)
                else:
                    try:
                        self._job = self._launch(run)
                    except Exception as e:  # a broken trainer command must not kill the worker
                        log.exception("cannot start %s", name)
                        run.update_status(state="failed", message=f"could not start the trainer: {e}")
                        return False
            job = self._job
        next_job = self._follow(job)
        with self._lock:
            self._job = next_job
            self._lock.notify_all()
        return False

    def _child_env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        # the child imports this very checkout of flatlora_diffusion, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def _evaluate(self, name: str) -> bool:
        """Run one evaluation to its end (the worker does nothing else meanwhile). True when stopping."""
        try:
            run = get_run(self.runs_dir, name)
            eval_job.check_evaluable(run)  # it may have been deleted or re-queued for training since
        except (KeyError, eval_job.EvaluationRefused) as e:
            log.warning("evaluation of %s skipped: %s", name, e)
            return False
        try:
            proc = eval_job.launch(run, self.trainer_command, self._child_env())
        except Exception as e:  # a broken command must not kill the worker
            log.exception("cannot start the evaluation of %s", name)
            write_eval_status(run, state="failed", message=f"could not start the evaluation: {e}")
            return False
        with self._lock:
            self._evaluating, self._eval_cancel = (name, proc), False
        try:
            while proc.poll() is None:
                if self._stop:
                    return True  # the app is going away; the evaluation finishes and writes eval.json anyway
                try:
                    proc.wait(timeout=self.poll_s)
                except subprocess.TimeoutExpired:
                    pass
            _kill_tree(proc.pid, signal.SIGKILL)  # leftovers of the tree
            eval_job.finish(run, proc.returncode, self._eval_cancel)
        finally:
            with self._lock:
                self._evaluating = None
                self._lock.notify_all()
        return False

    def _launch(self, run: Run) -> _Job:
        env = self._child_env()
        command = [*self.trainer_command, "train", "--config", str(run.path / "config.yaml")]
        with (run.path / LOG_FILE).open("ab") as logf:
            logf.write(f"[app] {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(command, cwd=run.path, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        run.update_status(pid=proc.pid)  # until the trainer writes its own
        return _Job(run, proc.pid, proc)

    def _follow(self, job: _Job) -> _Job | None:
        """Wait for the job's end and record it; returns a job to follow next (another trainer found holding
        the run folder), or None."""
        while True:
            code = job.poll()
            if code is not None:
                break
            if self._stop:
                return None  # the app is going away: leave the training running for the next app to adopt
            if job.proc is not None:
                try:
                    job.proc.wait(timeout=self.poll_s)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(self.poll_s)
        _kill_tree(job.pid, signal.SIGKILL)  # leftovers of the tree (workers whose parent died)
        other = trainer_pid(job.run) if code != 0 else None
        if other is not None and other != job.pid:  # ours was refused: another trainer holds the folder
            self._log(job.run, f"another trainer (pid {other}) holds this run folder; following it")
            return _Job(job.run, other, None)
        self._finish(job, code)
        return None

    @staticmethod
    def _log(run: Run, line: str) -> None:
        try:
            with (run.path / LOG_FILE).open("ab") as logf:
                logf.write(f"\n[app] {line}\n".encode())
        except OSError as e:  # the folder is gone, or the disk is full: the status says what happened
            log.warning("cannot write %s's log: %s", run.name, e)

    def _finish(self, job: _Job, code: int) -> None:
        run = job.run
        if not run.path.is_dir():
            log.warning("run folder %s disappeared while it trained", run.path)
            return
        status = run.status()
        self._log(run, "the adopted trainer process ended" if code == ADOPTED_GONE else f"trainer exited with code {code}")
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


def _stale_evaluations(runs_dir: Path) -> list[str]:
    """At start: evaluations an earlier app had queued (queued again, oldest first), and "running" ones whose
    process is gone (marked failed). A still-running one from an earlier app is left to finish on its own."""
    waiting = []
    for run in list_runs(runs_dir):
        try:
            st = eval_status(run)
            if st.get("state") == "queued":
                waiting.append((st.get("queued_at") or 0, run.name))
            elif st.get("state") == "running" and not pid_alive(st.get("pid")):
                write_eval_status(run, state="failed", message="the evaluation process is gone (the app stopped)")
        except Exception:  # one unreadable run folder must not keep the app from starting
            log.exception("cannot take over the evaluation of %s", run.name)
    return [name for _, name in sorted(waiting)]
