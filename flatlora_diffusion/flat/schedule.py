"""sigma_t: how strong the perturbation is at each optimizer step of a run."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def sigma_at(step: int, sigma: float, schedule: str = "cosine", total_steps: int = 1) -> float:
    """sigma_t at a global optimizer step (0-based).

    cosine: sigma * (1 - cos(pi t / T)) / 2, the increasing schedule of the official code; linear: sigma * t/T;
    constant: sigma. Past T the value stays at sigma.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown Flat-LoRA schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if sigma == 0.0:
        return 0.0
    if schedule == "constant":
        return float(sigma)
    progress = min(max(step, 0) / max(int(total_steps), 1), 1.0)
    if schedule == "linear":
        return float(sigma) * progress
    return float(sigma) * 0.5 * (1.0 - math.cos(math.pi * progress))
