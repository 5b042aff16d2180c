"""Run a wsss command that SIGKILLs itself at a chosen file write (used by the crash-safety tests).

    python tests/kill_harness.py PATTERN N PHASE -- COMMAND [ARGS...]

Every output of the pipeline is written through ``wsss.io.atomic_path``. The process kills itself
with SIGKILL during the N-th such write whose file name matches the glob PATTERN, at PHASE:

- ``created``: the empty temporary file exists, the output does not;
- ``written``: the temporary file is complete, not yet renamed;
- ``renamed``: the output is in place, the next write has not started.

Between them these are every state a SIGKILL can leave on disk (the rename itself is atomic), and
killing at a counted write, rather than after a timed wait, makes each kill point land exactly
where the seed put it, however loaded the machine is.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import sys
from pathlib import Path

import wsss.io

PHASES = ("created", "written", "renamed")


def install(pattern: str, nth: int, phase: str) -> None:
    """Replace ``wsss.io.atomic_path`` (before the stages import it) with a version that dies at the chosen write."""
    real_atomic_path = wsss.io.atomic_path
    count = 0

    def die_if(hit: bool, now: str) -> None:
        if hit and phase == now:
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def atomic_path(final, suffix=""):
        nonlocal count
        if fnmatch.fnmatch(Path(final).name, pattern):
            count += 1
        hit = count == nth and fnmatch.fnmatch(Path(final).name, pattern)
        with real_atomic_path(final, suffix) as tmp:
            die_if(hit, "created")
            yield tmp
            die_if(hit, "written")
        die_if(hit, "renamed")

    wsss.io.atomic_path = atomic_path


def main() -> int:
    pattern, nth, phase, separator, *command = sys.argv[1:]
    if separator != "--" or phase not in PHASES:
        raise SystemExit(__doc__)
    install(pattern, int(nth), phase)
    from wsss.cli import main as wsss_main

    return wsss_main(command)


if __name__ == "__main__":
    sys.exit(main())
