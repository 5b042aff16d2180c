"""User-facing errors: the CLI prints their message (which names the file and the problem) and exits 2."""
from __future__ import annotations

from collections.abc import Sequence

MAX_NAMED = 10  # how many offending ids or files an error message names


def name_some(items: Sequence[object], limit: int = MAX_NAMED) -> str:
    """``a, b, c, ... (N in all)``: the first few offenders for an error message."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class WsssError(Exception):
    """Base class of errors that are the user's to fix, not bugs."""


class DataError(WsssError):
    """A dataset, list, image, mask or CAM file is missing or malformed."""


class WeightsError(WsssError):
    """Weights or a checkpoint cannot be loaded (missing, wrong model, unsafe)."""


class ConfigError(WsssError):
    """An option or configuration value is invalid."""
