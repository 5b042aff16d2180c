"""SIGKILL at seeded random points of ``wsss cams``, ``wsss pseudo-labels`` and ``wsss train-seg``, then rerun.

Each command runs in a subprocess (tests/kill_harness.py) that kills itself with SIGKILL during
its N-th file write, at a seeded phase of that write. After every kill each output present must
decode, and the files finished by earlier runs must be the very same files (inode and mtime);
the final, uninterrupted rerun must complete everything, leave no temporary file, and give the
same outputs as a run that was never interrupted.
"""
from __future__ import annotations

import csv
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
from kill_harness import PHASES
from test_cams_stage import classifier_ckpt  # noqa: F401  (fixture: a random narrow classifier checkpoint)
from test_segment_stage import train_args

from wsss.cli import main as wsss_main
from wsss.data.voc import VOCLayout
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png
from wsss.io import is_temp_file
from wsss.records import RECORD_FILE

HARNESS = Path(__file__).resolve().parent / "kill_harness.py"
SEED = 20240611


def run_killed(args: list[str], pattern: str, nth: int, phase: str) -> None:
    """Run ``wsss ARGS`` and check that it died by SIGKILL at its nth write matching ``pattern``."""
    command = [sys.executable, str(HARNESS), pattern, str(nth), phase, "--", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, f"expected a SIGKILL at write {nth} ({phase}):\n{result.stdout}\n{result.stderr}"


def run_to_completion(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "wsss.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def outputs_and_temps(folder: Path, names: set[str]) -> tuple[dict[str, Path], list[str]]:
    """The expected outputs present in ``folder`` (by exact name, as every reader looks them up) and
    the other entries, which must all be temporary files."""
    present = {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}
    others = sorted(set(present) - names - {RECORD_FILE})  # the record of what made the folder is always there
    assert all(is_temp_file(name) for name in others), f"unexpected files in {folder}: {others}"
    return {name: present[name] for name in sorted(set(present) & names)}, others


def kill_schedule(seed: int) -> list[tuple[int, str]]:
    """(N, phase) per kill, each phase once in a seeded order; N >= 2 so every killed run
    finishes at least one write before dying."""
    rng = random.Random(seed)
    return [(rng.randint(2, 3), phase) for phase in rng.sample(PHASES, len(PHASES))]


def temp_file_target(name: str) -> str:
    """The output a temporary file was going to become: ``.<name>.<random>.<host>-<pid>.tmp<suffix>`` -> ``<name>``."""
    return name[1:].split(".tmp")[0].rsplit(".", 2)[0]


def kill_and_resume(args: list[str], folder: Path, names: set[str], suffix: str, check_file) -> None:
    """Kill ``wsss ARGS`` at the seeded writes, checking the folder after each kill, then run it to the end."""
    finished: dict[str, tuple[int, int]] = {}
    for nth, phase in kill_schedule(SEED):
        run_killed(args, f"*{suffix}", nth, phase)
        done, temps = outputs_and_temps(folder, names)
        for path in done.values():
            check_file(path)
        # Files finished by earlier runs were not rewritten; this run added exactly the writes it completed.
        assert {name: identity(done[name]) for name in finished} == finished
        assert len(done) == len(finished) + (nth if phase == "renamed" else nth - 1)
        # The write it died in left its temporary file (older orphans were swept), never an output.
        assert len(temps) == (0 if phase == "renamed" else 1), temps
        assert all(temp_file_target(name) in names - set(done) for name in temps)
        finished = {name: identity(path) for name, path in done.items()}
    run_to_completion(args)
    done, temps = outputs_and_temps(folder, names)
    assert set(done) == names and not temps
    assert {name: identity(done[name]) for name in finished} == finished
    for path in done.values():
        check_file(path)


# ----------------------------------------------------------------------------- wsss cams
def cams_args(root: Path, checkpoint: Path, out: Path) -> list:
    return ["cams", "--checkpoint", checkpoint, "--data-root", root, "--split", "train", "--out", out,
            "--num-workers", "0", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def reference_cams(toy_root, classifier_ckpt, tmp_path_factory) -> Path:  # noqa: F811
    """CAMs of the toy train split from one uninterrupted run (also the pseudo-label stage's input)."""
    out = tmp_path_factory.mktemp("reference") / "cams"
    assert wsss_main([str(a) for a in cams_args(toy_root, classifier_ckpt, out)]) == 0
    return out


@pytest.mark.slow
def test_cams_killed_at_random_points_resume_to_the_same_maps(toy_root, classifier_ckpt, reference_cams, tmp_path):  # noqa: F811
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")
    out = tmp_path / "cams"

    def check_file(path: Path) -> None:
        with np.load(path) as data:
            height, width = read_image(layout.image_path(path.stem)).shape[:2]
            assert data["cams"].shape == (len(data["classes"]), height, width)
            assert np.isfinite(data["cams"]).all()

    kill_and_resume(cams_args(toy_root, classifier_ckpt, out), out, {f"{i}.npz" for i in ids}, ".npz", check_file)
    for image_id in ids:
        with np.load(out / f"{image_id}.npz") as got, np.load(reference_cams / f"{image_id}.npz") as expected:
            assert got.files == expected.files
            for key in expected.files:
                np.testing.assert_array_equal(got[key], expected[key])


# ----------------------------------------------------------------------------- wsss pseudo-labels
@pytest.mark.slow
def test_pseudo_labels_killed_at_random_points_resume_to_the_same_labels(toy_root, reference_cams, tmp_path):
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")

    def args(out: Path) -> list:
        return ["pseudo-labels", "--data-root", toy_root, "--cams", reference_cams, "--out", out, "--split", "train",
                "--workers", "1", "--n-segments", "50"]

    def check_file(path: Path) -> None:
        labels = read_label_png(path)  # decodes, values in 0..20 / 255
        assert labels.shape == read_image(layout.image_path(path.stem)).shape[:2]

    reference = tmp_path / "reference"
    assert wsss_main([str(a) for a in args(reference)]) == 0
    out = tmp_path / "pseudo"
    kill_and_resume(args(out), out, {f"{i}.png" for i in ids}, ".png", check_file)
    for image_id in ids:
        assert (out / f"{image_id}.png").read_bytes() == (reference / f"{image_id}.png").read_bytes()


# ----------------------------------------------------------------------------- wsss train-seg
MAX_STEPS = 12


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def logged_train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.slow
def test_train_seg_killed_at_random_checkpoint_writes_resumes_to_max_steps(toy_root, tmp_path):
    # The same command every time, as a user would rerun it: `--ckpt_path last` starts from scratch
    # when there is no last.ckpt yet. last.ckpt every 2 steps, validation (best.ckpt) every 6.
    args = train_args(toy_root, tmp_path, "gt", MAX_STEPS, "--trainer.val_check_interval", "6",
                      "--last_checkpoint.every_n_train_steps", "2", "--trainer.log_every_n_steps", "1", "--ckpt_path", "last")
    ckpt_dir = tmp_path / "ckpt"
    saved_steps = [0]
    for nth, phase in kill_schedule(SEED + 1):
        run_killed(args, "*.ckpt", nth, phase)
        done, temps = outputs_and_temps(ckpt_dir, {"last.ckpt", "best.ckpt"})
        assert len(temps) == (0 if phase == "renamed" else 1), temps
        for path in done.values():
            checkpoint_step(path)  # complete: loads with weights_only=True
        # Its first write is last.ckpt, 2 steps past where it resumed, and it got past it (nth >= 2).
        saved_steps.append(checkpoint_step(ckpt_dir / "last.ckpt"))
        assert saved_steps[-1] > saved_steps[-2], saved_steps
    run_to_completion(args)
    done, temps = outputs_and_temps(ckpt_dir, {"last.ckpt", "best.ckpt"})
    assert set(done) == {"last.ckpt", "best.ckpt"} and not temps
    assert checkpoint_step(ckpt_dir / "last.ckpt") == MAX_STEPS
    # The final run's own log (a new CSV version) starts where the last kill left last.ckpt and
    # trains exactly the remaining steps: it did not restart at 0.
    final_run = max((tmp_path / "runs").rglob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    steps = logged_train_steps(final_run)
    assert len(steps) == MAX_STEPS - saved_steps[-1], (saved_steps, steps)
    assert min(steps) >= saved_steps[-1] > 0
