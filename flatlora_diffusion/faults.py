"""Fault injection for the reliability tests: FLATLORA_FAULT="action@point:n[,action@point:n...]".

The trainer calls `hit(point)` at the places where an interruption or an I/O error matters. When the
variable is unset (every real run), `hit` is a function that returns None and does nothing else.

Points (n counts the times this process reached the point, from 1: after a resume, "step:1" is the first
step this process makes):
  step            after an optimizer step, before its metrics line
  metrics         inside the metrics append, before the line is written
  ckpt_file       after each file of a checkpoint is written (still in checkpoint-N.partial)
  ckpt_state      after training_state.json is written, before the checkpoint is published (renamed)
  ckpt_published  after the rename, before older checkpoints are rotated out
  ckpt_rotate     after an old checkpoint is unpublished, before it is deleted
  ckpt_read       before a checkpoint is loaded on resume
  validation      after each validation image is written
  lora_tmp        inside a LoRA-file write: the temporary file is written, not yet moved into place
  lora_file       after the diffusers LoRA file is published, before the kohya file
Actions:
  kill     SIGKILL this process (no handler, no finally: a power cut for the files)
  term     SIGTERM this process (the web app's Cancel)
  int      SIGINT this process (Ctrl-C)
  enospc   raise OSError(ENOSPC)     eio   raise OSError(EIO)
  nan      return "nan": the caller makes the LoRA weights non-finite (a diverged update)
  hang     sleep 10 minutes, as a stuck native call would (signal handlers cannot break in)
"""

from __future__ import annotations

import errno
import os
import signal
import time

_ACTIONS = ("kill", "term", "int", "enospc", "eio", "nan", "hang")


def _parse(spec: str) -> dict[str, list[tuple[str, int]]]:
    plan: dict[str, list[tuple[str, int]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = item.partition("@")
        point, _, n = rest.partition(":")
        if action not in _ACTIONS or not point or not n.isdigit():
            raise ValueError(f"FLATLORA_FAULT: cannot read {item!r} (action@point:n, action one of {_ACTIONS})")
        plan.setdefault(point, []).append((action, int(n)))
    return plan


def _make_hit(plan: dict[str, list[tuple[str, int]]]):
    counts: dict[str, int] = {}

    def hit(point: str) -> str | None:
        faults = plan.get(point)
        if not faults:
            return None
        counts[point] = counts.get(point, 0) + 1
        at = counts[point]
        for action, when in faults:
            if when != at:
                continue
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)  # SIGKILL is delivered asynchronously; never run on
            if action == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            if action == "int":
                os.kill(os.getpid(), signal.SIGINT)
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {point})")
            if action == "eio":
                raise OSError(errno.EIO, os.strerror(errno.EIO) + f" (injected at {point})")
            if action == "hang":
                time.sleep(600)
            return action
        return None

    return hit


def _no_fault(point: str) -> None:
    return None


_SPEC = os.environ.get("FLATLORA_FAULT", "")
hit = _make_hit(_parse(_SPEC)) if _SPEC else _no_fault
