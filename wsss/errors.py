"""User-facing errors: the CLI prints their message (which names the file and the problem) and exits 2."""
from __future__ import annotations

from collections.abc import Sequence

MAX_NAMED = 10  # how many offending ids or files an error message names


def name_some(items: Sequence[object], limit: int = MAX_NAMED) -> str:
    """``a, b, c, ... (N in all)``: the first few offenders for an error message."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _without_worker_traceback(error_type: type, message: str) -> str:
    """The original message of an error that torch's DataLoader re-raised from a worker process.

    The DataLoader rebuilds a worker's exception as ``type(message)`` where ``message`` is
    "Caught DataError in DataLoader worker process 0. Original Traceback ...", ending with the
    formatted original; users must see only that original message, never the worker's traceback.
    """
    if not message.startswith("Caught ") or "\nOriginal Traceback (most recent call last):\n" not in message:
        return message
    last_line_prefix = f"\n{error_type.__module__}.{error_type.__qualname__}: "
    _, found, original = message.rpartition(last_line_prefix)
    return original.rstrip("\n") if found else message


class WsssError(Exception):
    """Base class of errors that are the user's to fix, not bugs."""

    def __init__(self, message: object = ""):
        super().__init__(_without_worker_traceback(type(self), str(message)))


class DataError(WsssError):
    """A dataset, list, image, mask or CAM file is missing or malformed."""


class WeightsError(WsssError):
    """Weights or a checkpoint cannot be loaded (missing, wrong model, unsafe)."""


class ConfigError(WsssError):
    """An option or configuration value is invalid."""


class OutputError(WsssError):
    """An output folder or file cannot be created or written."""
