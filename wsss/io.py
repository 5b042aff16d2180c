"""File plumbing shared by every writer: atomic writes, JSON, output-folder checks.

What is inside the files (images, label PNGs, CAM files, IRN's pickles, checkpoints) is
:mod:`wsss.formats`' business.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wsss.errors import OutputError


@functools.cache
def _umask() -> int:
    """The process umask, read once per process (outputs get 0666 less it).

    Linux reports it in /proc/self/status. Elsewhere the only way to read it is to set it and put
    it back, which is process-wide and races with other threads creating files: done once, on the
    first atomic write, never again. A umask changed later in the process is not seen.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are ``.<name>.<random>.<host>-<pid>.tmp<suffix>``: hidden, never named like an
# output, and tagged with their writer so a later run can tell an orphan from a file in progress.
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.tmp(\.[A-Za-z0-9]+)?$")
_swept_folders: set[Path] = set()


def is_temp_file(name: str) -> bool:
    """True for the name of an :func:`atomic_path` temporary file (never an output)."""
    return _TEMP_NAME.match(name) is not None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete the :func:`atomic_path` temporary files in ``folder`` whose writer is dead; returns how many.

    Only files written from this host by a process that no longer exists are touched (SIGKILL,
    power loss), so the temporary files of writers still running (other DDP ranks or workers
    writing into the same folder) are left alone. Files from other hosts of a shared filesystem
    are kept: their writers cannot be checked from here.
    """
    if os.name != "posix":
        return 0
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != _HOST or int(match["pid"]) <= 0 or _process_exists(int(match["pid"])):
            continue
        Path(entry.path).unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it over ``final`` only if the block succeeds.

    Readers therefore see either no file or a complete one, even after SIGKILL. A SIGKILL leaves
    the temporary file behind; the first write into a folder by a later process removes such
    orphans (:func:`remove_stale_temp_files`). ``suffix`` lets writers that insist on an
    extension (``np.savez`` adds ``.npz``) keep it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.parent not in _swept_folders:
        remove_stale_temp_files(final.parent)
        _swept_folders.add(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".{_HOST}-{os.getpid()}.tmp{suffix}", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600 files; outputs should get the permissions any new file gets (0666 less the
    # umask), or colleagues sharing a results folder could not read them.
    os.chmod(tmp_name, 0o666 & ~_umask())
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically; NumPy scalars and arrays become numbers and lists."""

    def plain(value):
        if hasattr(value, "tolist"):  # NumPy scalars and arrays, torch tensors
            return value.tolist()
        return str(value)

    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=plain) + "\n", encoding="utf-8")


def _why_not_writable(folder: Path) -> str | None:
    """None if a file can be written in ``folder`` (or, while it does not exist, in its deepest
    existing ancestor, where it would be created); else why not. Creates nothing."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
    except OSError as exc:
        return f"{existing}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None


def ensure_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Prove that files can be written in ``path`` (it may not exist yet), so that a stage fails
    at once with a message naming the folder, not when it first saves after hours of work."""
    path = Path(path).expanduser()
    reason = _why_not_writable(path)
    if reason is not None:
        raise OutputError(f"cannot write to {what} {path}: {reason}")
    return path


def ensure_output_file(path: str | Path, what: str = "output file") -> Path:
    """:func:`ensure_output_dir` for the folder of an output file (which must not be a folder)."""
    path = Path(path).expanduser()
    reason = "it is a folder" if path.is_dir() else _why_not_writable(path.parent)
    if reason is not None:
        raise OutputError(f"cannot write {what} {path}: {reason}")
    return path
