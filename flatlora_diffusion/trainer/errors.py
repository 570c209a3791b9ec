"""How a run stops before its last step: cancelled by the user, or diverged. Raised inside the Trainer, caught
by train() (which records the run's final state) and by the CLI (which prints one line)."""

from __future__ import annotations


class Cancelled(Exception):
    """Cancel (SIGTERM, Ctrl-C) was heard; the message says what of the run was saved."""


class TrainingDiverged(FloatingPointError):
    """The loss or the LoRA weights became NaN/inf; nothing non-finite was saved. One-line message."""
