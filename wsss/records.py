"""What made a stage folder: ``<folder>/wsss_record.json``, written by every stage that fills a
folder with per-image files (``cams``, ``refine``, ``pseudo-labels``, ``predict-seg``).

The record holds the stage's name, the parameters that change its files (result-neutral settings
such as workers or batch sizes are kept apart, for information), the identities of what it read
(a checkpoint's SHA-256, a CAM folder's own record, the label table), the code version and the
time. Before any work a stage *claims* its folder (:func:`claim_folder`):

- an empty folder, or one whose record has the same parameters and inputs: the stage goes on and
  skips the files already complete (resuming after a crash is unchanged);
- files made with other parameters or inputs, or files without a record (an older ``wsss``,
  another tool): refused with the differing values named, unless ``overwrite``, which removes the
  old files first so the folder never holds two runs.

This module is the only reader and writer of the record file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wsss.errors import ConfigError
from wsss.io import write_json

RECORD_FILE = "wsss_record.json"
_SHOWN_DIFFERENCES = 6


def record_path(folder: str | Path) -> Path:
    return Path(folder) / RECORD_FILE


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The folder's record, or None when it has none (or an unreadable one, which counts as none)."""
    try:
        record = json.loads(record_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "params" in record else None


def identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What two runs must share to write into one folder: stage, parameters, inputs' identities."""
    return {"stage": record.get("stage"), "params": record.get("params"), "inputs": record.get("inputs")}


def identity_digest(record: Mapping[str, Any]) -> str:
    """A short hash of :func:`identity`: how a later stage names the folder it read."""
    return hashlib.sha256(json.dumps(identity(record), sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (cached per path, size and mtime: a 60 MB checkpoint takes ~0.1 s)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def module_digest(model: Any) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): a classifier given as an
    object rather than a file is named by its weights."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()  # bytes of any dtype, bfloat16 included
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def folder_identity(folder: str | Path) -> str:
    """How a stage names an input folder of per-image files: its record's identity when it has one
    (so a moved or copied folder is still the same input), else its resolved path."""
    record = read_record(folder)
    return f"record:{identity_digest(record)}" if record is not None else f"path:{Path(folder).resolve()}"


@functools.cache
def code_version() -> str:
    """``wsss <version>``, with the git commit when the package runs from a checkout."""
    from wsss import __version__

    package = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"wsss {__version__}" + (f" ({commit})" if commit else "")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["method: 'layercam' -> 'gradcam'", ...]`` between two records' parameters and inputs."""
    before = {**_flat(old.get("params") or {}), **_flat(old.get("inputs") or {}, "input ")}
    after = {**_flat(new.get("params") or {}), **_flat(new.get("inputs") or {}, "input ")}
    if old.get("stage") != new.get("stage"):
        return [f"stage: {old.get('stage')!r} -> {new.get('stage')!r}"]
    return [f"{key}: {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def claim_folder(folder: str | Path, stage: str, params: Mapping[str, Any], inputs: Mapping[str, Any], *,
                 overwrite: bool, existing: Iterable[Path], what: str, resources: Mapping[str, Any] | None = None,
                 sources: Mapping[str, Any] | None = None, writer: bool = True) -> None:
    """Make ``folder`` this run's (see the module docstring), or raise ConfigError.

    ``params``: the result-changing parameters; ``inputs``: identities of what the stage reads
    (digests, not paths); ``existing``: the stage's output files already in the folder; ``what``:
    how the error names them ("CAM files"). ``resources`` (result-neutral settings) and ``sources``
    (input paths) are recorded for information only. ``writer``: False in every DDP process but
    the first, which checks the same way but leaves the folder to the first.
    """
    folder = Path(folder)
    # Through JSON, as the record will be read back: tuples become lists, paths strings.
    new = json.loads(json.dumps({"stage": stage, "params": dict(params), "inputs": dict(inputs)}, default=str))
    old = read_record(folder)
    files = list(existing)
    if old is not None and identity(old) == identity(new):
        stale = False
    elif old is None and not files:
        stale = False
    else:
        if old is None:
            reason = f"{len(files)} {what} with no record of the settings that made them (an older wsss or another tool)"
        else:
            changed = differences(old, new)
            shown = "; ".join(changed[:_SHOWN_DIFFERENCES]) + (f"; and {len(changed) - _SHOWN_DIFFERENCES} more" if len(changed) > _SHOWN_DIFFERENCES else "")
            reason = f"{what} made with other settings ({shown})"
        if not overwrite:
            raise ConfigError(f"{folder} holds {reason}; adding to them would mix two runs. Pass --overwrite to replace them, "
                              "or write to another folder")
        stale = True
    if not writer:
        return
    if stale:
        for path in files:
            path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record_path(folder), {**new, "resources": dict(resources or {}), "sources": {k: str(v) for k, v in (sources or {}).items()},
                                     "code": code_version(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
