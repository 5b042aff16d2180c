"""Per-step learning-rate schedules of the training systems."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def poly_factor(step: int, total_steps: int, power: float) -> float:
    """Poly learning-rate policy: (1 - step / total) ** power, never negative."""
    return max(0.0, 1.0 - step / max(1, total_steps)) ** power


SCHEDULES = ("poly", "step", "constant")


def schedule_factor(schedule: str, total_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """Factor of the base learning rate at each step: ``poly``, ``step`` (x0.1 from 2/3 of training)
    or ``constant``."""
    if schedule == "poly":
        return lambda step: poly_factor(step, total_steps, power)
    if schedule == "step":
        return lambda step: 0.1 if step >= 2 * total_steps // 3 else 1.0
    if schedule == "constant":
        return lambda step: 1.0
    raise ValueError(f"schedule {schedule!r} unknown; choose from {', '.join(SCHEDULES)}")


def held_until(factor: Callable[[int], float], hold_steps: int) -> Callable[[int], float]:
    """``factor`` with the first ``hold_steps`` steps at 0 (the group does not move yet)."""
    return lambda step: 0.0 if step < hold_steps else factor(step)


def per_step_schedule(optimizer: torch.optim.Optimizer, factor: Callable[[int], float] | list[Callable[[int], float]]) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: ``optimizer`` with each group's lr scaled by
    ``factor(step)`` at every optimiser step (``LambdaLR`` scales each group's own initial lr);
    a list gives one factor per param group."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
