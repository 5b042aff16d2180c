"""Stage 3: pseudo-labels from images + CAM files (``wsss pseudo-labels``).

One VOC-palette PNG per image (values 0..20) by eq. 10 superpixel voting (:mod:`wsss.pseudo`).
This module is plumbing only: reading and validating CAM files, a resumable parallel loop over
images, atomic writes and a summary.

Accepted CAM files, looked up as ``CAMDIR/<id>.npz`` first, then ``CAMDIR/<id>.npy``:

- ``.npz`` (this pipeline's CAM stage): ``classes`` (K,) integers, the VOC label values 1..20, and
  ``cams`` (K, H, W) floating point in [0, 1] at the image size. Other arrays (per-layer maps)
  are ignored unless selected with ``key``.
- ``.npy`` (IRN's ``make_cam.py``): a pickled dict with ``keys`` (K,) the *0-based foreground*
  class indices (label value - 1, no background entry) and ``high_res`` (K, H, W) maps in [0, 1]
  at the image size; ``cam`` is used when ``high_res`` is absent, provided it is a NumPy array at
  the image size (IRN's own ``cam`` is a stride-4 torch tensor and is refused). Files whose maps
  carry a background channel (K + 1 maps, as IRN's evaluation pads them in memory) are refused
  with a message saying so. Loaded with :func:`wsss.io.load_pickled_npy`, never
  ``np.load(allow_pickle=True)``.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from wsss.classes import NUM_CLASSES
from wsss.errors import MAX_NAMED, ConfigError, DataError, name_some
from wsss.io import ensure_output_dir, image_info, load_pickled_npy, read_image, read_label_png, write_label_png
from wsss.pseudo import DEFAULT_THRESHOLD, SLIC_DEFAULTS, superpixel_labels

log = logging.getLogger(__name__)

CAM_SUFFIXES = (".npz", ".npy")

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------- CAM files


def find_cam_file(cam_dir: Path, image_id: str) -> Path | None:
    """``CAMDIR/<id>.npz`` or, failing that, ``CAMDIR/<id>.npy``; None if neither exists."""
    for suffix in CAM_SUFFIXES:
        path = cam_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def find_cam_files(cam_dir: Path, ids: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """CAM file of every id, and the ids that have none (so all of them can be reported at once)."""
    if not cam_dir.is_dir():
        raise DataError(f"CAM directory not found: {cam_dir}")
    # One listdir instead of two stat calls per id (10k ids on network storage).
    present = {p.name for p in os.scandir(cam_dir)}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for image_id in ids:
        name = next((f"{image_id}{s}" for s in CAM_SUFFIXES if f"{image_id}{s}" in present), None)
        if name is None:
            missing.append(image_id)
        else:
            found[image_id] = cam_dir / name
    return found, missing


def _check_maps(path: Path, name: str, maps: Any, classes: np.ndarray) -> np.ndarray:
    if not isinstance(maps, np.ndarray):
        raise DataError(f"{path}: '{name}' must be a NumPy array, got {type(maps).__name__}")
    if maps.ndim != 3:
        raise DataError(f"{path}: '{name}' must have shape (K, H, W), got {maps.shape}")
    if maps.dtype.kind != "f":
        raise DataError(f"{path}: '{name}' must be floating point, got dtype {maps.dtype}")
    if maps.shape[0] != len(classes):
        raise DataError(f"{path}: '{name}' holds {maps.shape[0]} maps for {len(classes)} classes")
    if maps.size:
        if not np.isfinite(maps).all():
            raise DataError(f"{path}: '{name}' contains NaN or Inf")
        low, high = float(maps.min()), float(maps.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f"{path}: '{name}' must lie in [0, 1], found values in [{low:g}, {high:g}]")
    return maps


def _check_classes(path: Path, name: str, values: Any, offset: int) -> np.ndarray:
    """Label values (1..20) from ``values``; ``offset`` is 1 for IRN's 0-based keys."""
    labels = np.asarray(values)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: '{name}' must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    labels = labels.astype(np.int64) + offset
    allowed = f"0..{NUM_CLASSES - 1} (0-based, no background)" if offset else f"1..{NUM_CLASSES}"
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DataError(f"{path}: '{name}' values must be in {allowed}, got {(labels - offset).tolist()}")
    if len(np.unique(labels)) != len(labels):
        raise DataError(f"{path}: '{name}' has repeated classes {(labels - offset).tolist()}")
    return labels


def load_cams(path: str | Path, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CAM file (see the module docstring for the accepted formats).

    Args:
        path: ``<id>.npz`` or IRN-style ``<id>.npy``.
        key: array holding the maps; default ``cams`` (npz) or ``high_res``/``cam`` (npy). A
            per-layer array (e.g. ``stage3``) must have the same (K, H, W) layout in [0, 1].

    Returns:
        ``(cams, classes)``: (K, H, W) float maps in [0, 1] and the (K,) int64 label values 1..20.

    Raises:
        DataError naming the file: unreadable, missing keys, wrong dtype/shape, NaN/Inf, out of range.
    """
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                name = key or "cams"
                absent = [k for k in ("classes", name) if k not in data.files]
                if absent:
                    raise DataError(f"{path}: missing arrays {absent} (has {sorted(data.files)})")
                raw_classes, maps = data["classes"], data[name]
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except Exception as exc:  # zip/pickle/format errors: the file is damaged or not an npz
            raise DataError(f"{path}: cannot read CAM file ({type(exc).__name__}: {exc})") from None
        classes = _check_classes(path, "classes", raw_classes, offset=0)
    elif path.suffix == ".npy":
        data = load_pickled_npy(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected an IRN-style dict with 'keys' and 'high_res', got {type(data).__name__}")
        name = key or ("high_res" if "high_res" in data else "cam")
        absent = [k for k in ("keys", name) if k not in data]
        if absent:
            raise DataError(f"{path}: missing entries {absent} (has {sorted(map(str, data))})")
        maps = data[name]
        classes = _check_classes(path, "keys", data["keys"], offset=1)
        if isinstance(maps, np.ndarray) and maps.ndim == 3 and maps.shape[0] == len(classes) + 1:
            raise DataError(
                f"{path}: '{name}' has {maps.shape[0]} maps for {len(classes)} keys; a background channel "
                "is not accepted: store only the foreground maps with 0-based keys"
            )
    else:
        raise DataError(f"{path}: CAM files must be .npz or .npy")
    return _check_maps(path, name, maps, classes), classes


# --------------------------------------------------------------------------- one image


def is_valid_label_png(path: Path, size: tuple[int, int] | None = None) -> bool:
    """True when ``path`` is a complete label PNG with valid values (and ``(H, W)`` == ``size``)."""
    if not path.is_file():
        return False
    try:
        labels = read_label_png(path)
    except DataError:
        return False
    return size is None or labels.shape == tuple(size)


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header, without decoding it."""
    return image_info(path)[:2]


@dataclass(frozen=True)
class PseudoLabelJob:
    """Everything one image needs; picklable, so it can be sent to a worker process."""

    image_id: str
    image_path: Path
    cam_path: Path
    out_path: Path


@dataclass(frozen=True)
class PseudoLabelParams:
    """Settings shared by every image."""

    threshold: float = DEFAULT_THRESHOLD
    slic: dict[str, Any] = field(default_factory=dict)  # overrides of SLIC_DEFAULTS
    key: str | None = None
    overwrite: bool = False


def make_pseudo_label(
    image_path: Path,
    cam_path: Path,
    out_path: Path | None,
    threshold: float = DEFAULT_THRESHOLD,
    key: str | None = None,
    **slic_kwargs: Any,
) -> np.ndarray:
    """Load an image and its CAM file, vote per superpixel (eq. 10), write ``out_path`` atomically.

    Returns the (H, W) uint8 label map. ``out_path=None`` skips writing (sweeps, tests).
    Raises DataError naming the file on any input problem.
    """
    image = read_image(image_path)
    cams, classes = load_cams(cam_path, key)
    if cams.shape[1:] != image.shape[:2]:
        raise DataError(
            f"{cam_path}: maps have spatial shape {tuple(cams.shape[1:])} but image {image_path.name} "
            f"is {image.shape[0]}x{image.shape[1]} (CAMs must be at the original image size)"
        )
    labels = superpixel_labels(image, cams, classes, threshold=threshold, **slic_kwargs)
    if out_path is not None:
        write_label_png(out_path, labels)
    return labels


def _run_job(job: PseudoLabelJob, params: PseudoLabelParams) -> tuple[str, str, str]:
    """``(id, status, message)`` with status ``written``, ``skipped`` or ``failed``."""
    try:
        if not params.overwrite and job.out_path.exists():
            if is_valid_label_png(job.out_path, _image_size(job.image_path)):
                return job.image_id, "skipped", ""
        make_pseudo_label(job.image_path, job.cam_path, job.out_path, params.threshold, params.key, **params.slic)
        return job.image_id, "written", ""
    except DataError as exc:
        return job.image_id, "failed", str(exc)


def _run_jobs(args: tuple[list[PseudoLabelJob], PseudoLabelParams]) -> list[tuple[str, str, str]]:
    jobs, params = args
    return [_run_job(job, params) for job in jobs]


# --------------------------------------------------------------------------- parallel plumbing


def _worker_init() -> None:
    # Each worker is one of N processes: keep BLAS/torch from starting N threads each.
    # Only if torch is already loaded (evaluation): importing it here would cost seconds per worker.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of at most ``size`` items."""
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


def parallel_imap(fn: Callable[[T], R], tasks: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``tasks`` in ``workers`` processes, results as they finish (in-process if 1).

    ``fn`` must be a module-level function; give it chunks of work so each task is worth a
    round trip. Worker exceptions propagate and the pool is torn down.
    """
    if workers <= 1:
        # Per-image tensors are small: torch's intra-op threads cost more than they give,
        # badly so on a shared machine. Limit them for the duration, as the workers do.
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else None
        try:
            if torch is not None:
                torch.set_num_threads(1)
            yield from map(fn, tasks)
        finally:
            if torch is not None:
                torch.set_num_threads(threads)
        return
    with multiprocessing.get_context().Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap_unordered(fn, tasks)


# --------------------------------------------------------------------------- the stage


@dataclass
class PseudoLabelSummary:
    """What a run did; ``failed`` maps id -> error message."""

    written: int = 0
    skipped_existing: int = 0
    skipped_missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        done = self.written + self.skipped_existing + len(self.failed)
        rate = self.written / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"{self.written} written, {self.skipped_existing} skipped (already done), "
            f"{len(self.skipped_missing)} skipped (no CAM file), {len(self.failed)} failed; "
            f"{done} images in {self.seconds:.1f}s ({rate:.1f} written/s)"
        )


def generate_pseudo_labels(
    image_paths: dict[str, Path],
    cam_dir: Path,
    out_dir: Path,
    params: PseudoLabelParams = PseudoLabelParams(),
    workers: int = 1,
    skip_missing: bool = False,
    chunk_size: int = 8,
    progress: bool = True,
) -> PseudoLabelSummary:
    """Write ``out_dir/<id>.png`` for every id of ``image_paths`` (id -> image file).

    Validates up front that every listed id has a CAM file (all missing ids reported in one
    DataError unless ``skip_missing``). Existing valid PNGs are kept unless ``params.overwrite``.
    Per-image input errors do not stop the run; they are collected in the summary (the caller
    decides whether that is fatal).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    ids = list(image_paths)
    cam_files, missing = find_cam_files(Path(cam_dir), ids)
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(ids)} listed ids have no CAM file (<id>.npz or <id>.npy) in {cam_dir}: "
            f"{name_some(missing)} (pass --skip-missing to leave them out)"
        )
    summary = PseudoLabelSummary(skipped_missing=missing)
    jobs = [PseudoLabelJob(i, image_paths[i], cam_files[i], Path(out_dir) / f"{i}.png") for i in ids if i in cam_files]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tasks = [(chunk, params) for chunk in chunked(jobs, chunk_size)]
    with tqdm(total=len(jobs), desc="pseudo-labels", unit="img", disable=not progress, smoothing=0.1) as bar:
        for results in parallel_imap(_run_jobs, tasks, workers):
            for image_id, status, message in results:
                if status == "written":
                    summary.written += 1
                elif status == "skipped":
                    summary.skipped_existing += 1
                else:
                    summary.failed[image_id] = message
            bar.update(len(results))
    summary.seconds = time.perf_counter() - start
    return summary


def _finite(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def main(argv: list[str]) -> int:
    """``wsss pseudo-labels``: see ``--help``."""
    from wsss.data import resolve_data_root
    from wsss.data.voc import VOCLayout

    parser = argparse.ArgumentParser(
        prog="wsss pseudo-labels",
        description="Images + CAM files -> OUT/<id>.png VOC-palette pseudo-labels (SLIC superpixel voting, "
        "LayerCAM eq. 10). Resumable: existing valid PNGs are kept unless --overwrite.",
    )
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz (or IRN <id>.npy) CAM files")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <id>.png")
    parser.add_argument("--split", default="train_aug", help="split name or list file (default: train_aug)")
    parser.add_argument("--threshold", type=_finite, default=DEFAULT_THRESHOLD, help="background threshold on a superpixel's mean CAM score (default: 0.3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing PNGs")
    parser.add_argument("--skip-missing", action="store_true", help="leave out ids without a CAM file (counted and reported) instead of failing")
    parser.add_argument("--key", default=None, help="array of the CAM file to use (default: cams / IRN high_res), e.g. a per-layer map")
    parser.add_argument("--n-segments", type=int, default=None, help=f"SLIC n_segments (default {SLIC_DEFAULTS['n_segments']})")
    parser.add_argument("--compactness", type=_finite, default=None, help=f"SLIC compactness (default {SLIC_DEFAULTS['compactness']})")
    parser.add_argument("--sigma", type=_finite, default=None, help=f"SLIC Gaussian pre-smoothing (default {SLIC_DEFAULTS['sigma']})")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.n_segments is not None and args.n_segments < 1:
        raise ConfigError(f"--n-segments must be >= 1, got {args.n_segments}")
    if args.compactness is not None and args.compactness <= 0:
        raise ConfigError(f"--compactness must be > 0, got {args.compactness}")
    if args.sigma is not None and args.sigma < 0:
        raise ConfigError(f"--sigma must be >= 0, got {args.sigma}")
    slic = {k: v for k, v in (("n_segments", args.n_segments), ("compactness", args.compactness), ("sigma", args.sigma)) if v is not None}

    layout = VOCLayout(resolve_data_root(args.data_root))
    ids = layout.read_ids(args.split)
    layout.check_images(ids)
    ensure_output_dir(args.out)
    params = PseudoLabelParams(threshold=args.threshold, slic=slic, key=args.key, overwrite=args.overwrite)
    log.info("%d ids from %s; SLIC %s; threshold %g; %d workers", len(ids), args.split, {**SLIC_DEFAULTS, **slic}, args.threshold, args.workers)
    summary = generate_pseudo_labels(
        {i: layout.image_path(i) for i in ids}, args.cams, args.out, params, workers=args.workers, skip_missing=args.skip_missing
    )
    print(f"pseudo-labels -> {args.out}: {summary.line()}")
    if summary.skipped_missing:
        print(f"ids without a CAM file (skipped): {name_some(summary.skipped_missing)}")
    if summary.failed:
        messages = list(summary.failed.values())
        raise DataError(f"{len(messages)} images failed (nothing partial was written):\n  " + "\n  ".join(messages[:MAX_NAMED])
                        + (f"\n  ... and {len(messages) - MAX_NAMED} more" if len(messages) > MAX_NAMED else ""))
    return 0
