"""Manifests: what each step of a run last did, and whether it must run again.

Each step keeps ``OUT/manifests/<step>.json``: a hash of its own configuration and of the hashes
of the steps it reads from, its counts and numbers, its time and ``finished``. A step is skipped
when its manifest is finished with the current hash and its outputs are all on disk; it resumes
when the manifest has the current hash but is not finished (interrupted); otherwise (another hash,
``--from``/``--force``) it starts afresh from empty output folders.
"""
from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsss.io import write_json

FOLDER = "manifests"


def digest(payload: Any) -> str:
    """A short, stable hash of any JSON-able payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(out: Path, step: str) -> dict[str, Any] | None:
    """``OUT/manifests/<step>.json``, or None when absent or unreadable."""
    try:
        manifest = json.loads((out / FOLDER / f"{step}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(out: Path, step: str, record: dict[str, Any]) -> None:
    write_json(out / FOLDER / f"{step}.json", record)


class Decision(enum.Enum):
    SKIP = "skipped (up to date)"
    RESUME = "running (resuming)"
    FRESH = "running"


def decide(manifest: dict[str, Any] | None, step_hash: str, forced: bool, complete: Callable[[], bool]) -> Decision:
    """Skip, resume or start afresh (see the module docstring); ``complete`` (are the outputs all on
    disk?) is asked only when the manifest alone would skip the step."""
    same = not forced and manifest is not None and manifest.get("hash") == step_hash
    if same and manifest.get("finished") is True and complete():
        return Decision.SKIP
    return Decision.RESUME if same else Decision.FRESH
