"""Checkpoints and weight files: ``torch.load(weights_only=True)`` with errors naming the file.

``weights_only=True`` is passed explicitly, whatever torch's default (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
cannot turn it off): only tensors and plain containers load, so a crafted pickle cannot run code.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from wsss.errors import WeightsError


def refused_global(exc: Exception) -> str:
    """`` (module.name)`` of the global torch's weights-only unpickler refused, from its page-long message."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return f" ({found[1]})" if found else ""


def load_torch_file(path: str | Path, what: str = "file") -> Any:
    """The contents of a ``torch.save`` file, loaded on the CPU with ``weights_only=True``;
    WeightsError naming the file when missing, unsafe or unreadable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive (PK..); files of torch < 1.6 and plain pickles start with the
    # pickle protocol byte 0x80. Anything else is not a torch file: say so instead of a KeyError.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise WeightsError(f"{path} is not a torch file ({what}): torch.save writes a zip archive or a pickle, "
                           f"this file starts with {head!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's own text is a page of advice; keep the offending name
        raise WeightsError(f"{path}: refusing to load {what}: it holds pickled objects other than tensors and plain "
                           f"containers{refused_global(exc)}, which could run code when loaded") from None
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load {what} safely ({type(exc).__name__}: {exc})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint (``state_dict``, ``hyper_parameters``, ...) as a dict, loaded safely."""
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} is not a Lightning checkpoint")
    return checkpoint
