"""Cancel: SIGTERM (the web app's Cancel button) and Ctrl-C set the flag that the Trainer checks between steps
and between validation images. Knows signals and threads only, nothing of runs: what to record when the
trainer is stuck is the caller's `on_stuck`."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger("flatlora_diffusion")


class CancelWatch:
    """SIGTERM (the web app's Cancel) and Ctrl-C: set the flag the loop and the validation sampler check.

    A Python signal handler only runs between bytecodes, so a main thread stuck in one long native call (a huge
    allocation, a slow kernel) would ignore it. The C-level handler still writes the signal number to a wakeup
    pipe; a watcher thread reads it and, when the main thread has not stopped within the grace period, calls
    `on_stuck` (train() records the run as cancelled) and exits the process (the lock goes with it; half-written
    files are temporary ones).
    """

    def __init__(self, cancelled: dict, on_stuck: Callable[[], None] | None = None):
        self.cancelled, self.on_stuck = cancelled, on_stuck
        self.grace_s = float(os.environ.get("FLATLORA_CANCEL_GRACE_S", "10"))
        self.done = threading.Event()
        self.installed = False

    def install(self) -> None:
        if not _main_thread():
            return
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
        self.previous_int_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="flatlora-cancel-watch", daemon=True)
        self.thread.start()
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGTERM, self.previous_handler)
        signal.signal(signal.SIGINT, self.previous_int_handler)
        try:
            os.write(self.write_fd, b"\0")  # wake the watcher so that it ends
        except OSError:
            pass
        self.thread.join(2)
        os.close(self.read_fd)
        os.close(self.write_fd)
        self.installed = False

    def _on_signal(self, signum, frame):
        self.cancelled["flag"] = True

    def _on_interrupt(self, signum, frame):
        """The first Ctrl-C cancels like SIGTERM (the step finishes and is saved); a second one interrupts at
        once, as Ctrl-C does everywhere else."""
        self.cancelled["flag"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _watch(self) -> None:
        while not self.done.is_set():
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return
            if self.done.is_set() or not data:
                return
            if signal.SIGTERM in data or signal.SIGINT in data:
                self.cancelled["flag"] = True
                logger.warning("cancel requested: finishing this step, then saving a checkpoint and the LoRA files")
                if self.done.wait(self.grace_s):
                    return
                logger.error("cancelled, and the trainer did not stop within %.0f s: exiting now", self.grace_s)
                if self.on_stuck is not None:
                    self.on_stuck()
                os._exit(130)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
