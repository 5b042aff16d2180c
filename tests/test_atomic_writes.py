"""``wsss.io.atomic_path``: what a SIGKILL leaves behind, and who may clean it up."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wsss.formats.cams import write_cams
from wsss.io import atomic_path, is_temp_file, remove_stale_temp_files

# A writer that stops inside atomic_path: temp file written, not renamed, until GO appears.
WRITER = """
import sys, time
from pathlib import Path
from wsss.io import atomic_path
folder = Path(sys.argv[1])
with atomic_path(folder / (sys.argv[2] + ".npz"), ".npz") as tmp:
    tmp.write_bytes(b"half a file")
    (folder / (sys.argv[2] + ".ready")).touch()
    while not (folder / "GO").exists():
        time.sleep(0.02)
"""


def start_writer(folder: Path, name: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), name])
    deadline = time.monotonic() + 120
    while not (folder / f"{name}.ready").exists():  # wait for progress, not for a fixed time
        assert process.poll() is None and time.monotonic() < deadline, "writer did not reach its temporary file"
        time.sleep(0.02)
    return process


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temp_file(p.name))


def test_orphans_of_dead_writers_are_swept_and_live_writers_are_left_alone(tmp_path):
    killed = start_writer(tmp_path, "killed")
    alive = start_writer(tmp_path, "alive")  # e.g. another DDP rank writing into the same folder
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        orphans = temp_files(tmp_path)
        assert len(orphans) == 2 and not (tmp_path / "killed.npz").exists()
        assert all(name.startswith((".killed.npz.", ".alive.npz.")) and name.endswith(".tmp.npz") for name in orphans)

        # The first write of this process into the folder sweeps the dead writer's file only.
        write_cams(tmp_path / "mine.npz", classes=np.arange(3), cams=np.zeros((3, 2, 2), np.float16))
        left = temp_files(tmp_path)
        assert len(left) == 1 and left[0].startswith(".alive.npz.")
        (tmp_path / "GO").touch()
        assert alive.wait(timeout=120) == 0
    finally:
        for process in (killed, alive):
            if process.poll() is None:
                process.kill()
    assert (tmp_path / "alive.npz").read_bytes() == b"half a file"  # its rename was not disturbed
    with np.load(tmp_path / "mine.npz") as data:
        np.testing.assert_array_equal(data["classes"], np.arange(3))
    assert temp_files(tmp_path) == []


def test_temp_names_are_hidden_and_only_this_hosts_orphans_are_removed(tmp_path):
    with atomic_path(tmp_path / "toy_00001.png", ".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".toy_00001.png.") and tmp.suffix == ".png"
        assert is_temp_file(tmp.name) and tmp.name != "toy_00001.png"
        name = tmp.name
    assert not is_temp_file("toy_00001.png") and not is_temp_file(".toy_00001.png")
    # The same name as written by a process that has exited, here and on another host of a shared filesystem.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    here, pid = name.split(".tmp")[0].rsplit(".", 1)[1].rsplit("-", 1)
    ours = tmp_path / name.replace(f"{here}-{pid}.tmp", f"{here}-{dead.stdout.strip()}.tmp")
    foreign = tmp_path / name.replace(f"{here}-{pid}.tmp", f"{here}elsewhere-{dead.stdout.strip()}.tmp")
    ours.touch()
    foreign.touch()
    assert is_temp_file(ours.name) and is_temp_file(foreign.name)
    assert remove_stale_temp_files(tmp_path) == 1
    assert not ours.exists() and foreign.exists()  # the other host's writer cannot be checked from here
