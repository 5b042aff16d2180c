"""Argument types and checks the stage CLIs share (not a stage: stages import it, it imports no stage)."""
from __future__ import annotations

import argparse
import math

from wsss.errors import ConfigError

IRN_SCALES = (1.0, 0.5, 1.5, 2.0)  # ``--scales irn``: IRN's make_cam.py views


def names(text: str) -> tuple[str, ...]:
    """``"stage3, stage5"`` -> ``("stage3", "stage5")``; ``""`` -> ``()``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def scales(text: str) -> tuple[float, ...]:
    """Positive scale factors, comma- or space-separated (``0.75,1,1.25``), or ``irn``."""
    if text.strip() == "irn":
        return IRN_SCALES
    try:
        values = tuple(float(s) for s in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be numbers, e.g. '0.75,1.0,1.25', got {text!r}") from None
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return values


def finite(text: str) -> float:
    """A finite float."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def check_at_least(option: str, value: float | None, minimum: float, strict: bool = False) -> None:
    """ConfigError unless ``value`` (when given) is >= ``minimum`` (> with ``strict``)."""
    if value is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{option} must be {'>' if strict else '>='} {minimum:g}, got {value}")
