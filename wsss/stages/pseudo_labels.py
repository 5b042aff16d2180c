"""Stage 3: pseudo-labels from images + CAM files (``wsss pseudo-labels``).

One VOC-palette PNG per image (values 0..20) by eq. 10 superpixel voting (:mod:`wsss.pseudo`).
This module is plumbing only: reading and validating CAM files, a resumable loop over images
(a Lightning predict loop, so it runs under DDP like ``wsss cams``), atomic writes and a summary.

Accepted CAM files, looked up as ``CAMDIR/<id>.npz`` first, then ``CAMDIR/<id>.npy``:

- ``.npz`` (this pipeline's CAM stage): ``classes`` (K,) integers, the VOC label values 1..20, and
  ``cams`` (K, H, W) floating point in [0, 1] at the image size. Other arrays (per-layer maps)
  are ignored unless selected with ``key``.
- ``.npy`` (IRN's ``make_cam.py``, or ``wsss cams --format irn``): a pickled dict with ``keys`` (K,)
  the *0-based foreground* class indices (label value - 1, no background entry) and ``high_res``
  (K, H, W) maps in [0, 1] at the image size; ``cam`` is used when ``high_res`` is absent, and must
  then be at the image size too (IRN's own ``cam`` is at stride 4, so it is refused as the wrong
  size). Entries may be NumPy arrays or torch tensors (IRN stores ``keys`` and ``cam`` as tensors).
  Files whose maps carry a background channel (K + 1 maps, as IRN's evaluation pads them in
  memory) are refused with a message saying so. Loaded with :func:`wsss.io.load_pickled_npy`,
  never ``np.load(allow_pickle=True)``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import Dataset

from wsss.classes import NUM_CLASSES
from wsss.data.modules import PredictDataModule
from wsss.errors import MAX_NAMED, ConfigError, DataError, name_some
from wsss.io import ensure_output_dir, image_info, load_pickled_npy, read_image, read_label_png, write_label_png
from wsss.lightning import gather_objects, is_global_zero, parse_devices, predict_trainer
from wsss.pseudo import DEFAULT_THRESHOLD, SLIC_DEFAULTS, superpixel_labels

log = logging.getLogger(__name__)

CAM_SUFFIXES = (".npz", ".npy")
FUSE_SEPARATOR = "+"  # ``key="stage4+stage5"``: fuse saved per-layer maps by element-wise maximum


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


def _tensor_as_numpy(value: Any) -> Any:
    """A torch tensor (IRN stores ``keys`` and ``cam`` as tensors) as NumPy: integers as int64, floating
    point as float32, other dtypes unchanged for the checks to refuse; anything else is returned as is."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.float()
    elif not value.is_complex() and value.dtype != torch.bool:
        value = value.long()
    return value.numpy()


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
            per-layer array (e.g. ``stage3``) must have the same (K, H, W) layout in [0, 1];
            ``stage4+stage5`` fuses saved per-layer arrays by element-wise maximum (npz only).

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
                parts = name.split(FUSE_SEPARATOR)
                absent = [k for k in ("classes", *parts) if k not in data.files]
                if absent:
                    raise DataError(f"{path}: missing arrays {absent} (has {sorted(data.files)})")
                raw_classes, part_maps = data["classes"], [data[part] for part in parts]
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except Exception as exc:  # zip/pickle/format errors: the file is damaged or not an npz
            raise DataError(f"{path}: cannot read CAM file ({type(exc).__name__}: {exc})") from None
        classes = _check_classes(path, "classes", raw_classes, offset=0)
        # "stage4+stage5": the element-wise maximum of saved per-layer maps, i.e. eq. 9's fusion
        # of those layers without tanh scaling (they are stored normalised at the image size).
        if len(parts) > 1:
            checked = [_check_maps(path, part, m, classes) for part, m in zip(parts, part_maps)]
            if len({m.shape for m in checked}) > 1:
                raise DataError(f"{path}: arrays {parts} differ in shape ({[m.shape for m in checked]}); they cannot be fused")
            part_maps = [np.maximum.reduce(checked)]
        maps = part_maps[0]
    elif path.suffix == ".npy":
        data = load_pickled_npy(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected an IRN-style dict with 'keys' and 'high_res', got {type(data).__name__}")
        name = key or ("cam" if "high_res" not in data and "cam" in data else "high_res")
        absent = [k for k in ("keys", name) if k not in data]
        if absent:
            raise DataError(f"{path}: missing entries {absent} (has {sorted(map(str, data))})")
        maps = _tensor_as_numpy(data[name])
        classes = _check_classes(path, "keys", _tensor_as_numpy(data["keys"]), offset=1)
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
    """Everything one image needs."""

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


# --------------------------------------------------------------------------- the per-image loop
# A Lightning predict loop, so ``--devices N --strategy ddp`` splits the images over processes:
# the dataset does each image's work (in DataLoader workers), a parameter-free module passes the
# results on, and the writer writes the PNGs in each process's main thread.


@dataclass
class PseudoLabelSummary:
    """What a run did (one process's share inside the writer, every process's total once
    :func:`generate_pseudo_labels` returns); ``failed`` maps id -> error message."""

    written: int = 0
    skipped_existing: int = 0
    skipped_missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    processes: int = 1

    def line(self) -> str:
        done = self.written + self.skipped_existing + len(self.failed)
        rate = self.written / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"{self.written} written, {self.skipped_existing} skipped (already done), "
            f"{len(self.skipped_missing)} skipped (no CAM file), {len(self.failed)} failed; "
            f"{done} images in {self.seconds:.1f}s ({rate:.1f} written/s, {self.processes} "
            f"process{'es' if self.processes > 1 else ''})"
        )


class PseudoLabelDataset(Dataset):
    """Item i: image i's label map, or why it has none.

    ``{"id", "status": "labelled" | "skipped" | "failed", "labels": (H, W) uint8 or None, "message"}``;
    ``skipped`` means a valid PNG of the right size is already there (kept unless ``overwrite``).
    Input errors (DataError) become ``failed`` items, so one bad file does not stop the run.
    """

    def __init__(self, jobs: Sequence[PseudoLabelJob], params: PseudoLabelParams):
        self.jobs, self.params = list(jobs), params

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        job, params = self.jobs[index], self.params
        item: dict[str, Any] = {"id": job.image_id, "status": "skipped", "labels": None, "message": ""}
        try:
            if not params.overwrite and job.out_path.exists() and is_valid_label_png(job.out_path, _image_size(job.image_path)):
                return item
            item["labels"] = make_pseudo_label(job.image_path, job.cam_path, None, params.threshold, params.key, **params.slic)
            item["status"] = "labelled"
        except DataError as exc:
            item.update(status="failed", message=str(exc))
        return item


class PassThroughPredictor(pl.LightningModule):
    """Parameter-free predict module for stages whose dataset already did the per-item work."""

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        return batch


class PseudoLabelWriter(BasePredictionWriter):
    """Writes each label map to ``out_dir/<id>.png`` (atomic) and counts this process's outcomes."""

    def __init__(self, out_dir: Path):
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self.counts = PseudoLabelSummary()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for item in prediction:
            if item["status"] == "labelled":
                write_label_png(self.out_dir / f"{item['id']}.png", item["labels"])
                self.counts.written += 1
            elif item["status"] == "skipped":
                self.counts.skipped_existing += 1
            else:
                self.counts.failed[item["id"]] = item["message"]


def generate_pseudo_labels(
    image_paths: dict[str, Path],
    cam_dir: Path,
    out_dir: Path,
    params: PseudoLabelParams = PseudoLabelParams(),
    workers: int = 1,
    skip_missing: bool = False,
    progress: bool = True,
    accelerator: str = "cpu",
    devices: int | str = 1,
    strategy: str = "auto",
) -> PseudoLabelSummary:
    """Write ``out_dir/<id>.png`` for every id of ``image_paths`` (id -> image file).

    Validates up front that every listed id has a CAM file (all missing ids reported in one
    DataError unless ``skip_missing``). Existing valid PNGs are kept unless ``params.overwrite``.
    Per-image input errors do not stop the run; they are collected in the summary (the caller
    decides whether that is fatal). ``workers`` DataLoader worker processes per process (none
    when 1); ``accelerator``/``devices``/``strategy`` go to the Lightning Trainer, and under DDP
    each image is done by exactly one process and the summary holds the totals of all of them.
    """
    start = time.perf_counter()
    ids = list(image_paths)
    cam_files, missing = find_cam_files(Path(cam_dir), ids)
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(ids)} listed ids have no CAM file (<id>.npz or <id>.npy) in {cam_dir}: "
            f"{name_some(missing)} (pass --skip-missing to leave them out)"
        )
    jobs = [PseudoLabelJob(i, image_paths[i], cam_files[i], Path(out_dir) / f"{i}.png") for i in ids if i in cam_files]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    summary = PseudoLabelSummary(skipped_missing=missing)
    if jobs:
        writer = PseudoLabelWriter(Path(out_dir))
        trainer = predict_trainer(writer, accelerator, devices, strategy, progress)
        data = PredictDataModule(PseudoLabelDataset(jobs, params), batch_size=1, num_workers=workers if workers > 1 else 0, collate_fn=list)
        trainer.predict(PassThroughPredictor(), datamodule=data, return_predictions=False)
        per_process = gather_objects(trainer, writer.counts)
        failed = {image_id: message for counts in per_process for image_id, message in counts.failed.items()}
        summary.written = sum(counts.written for counts in per_process)
        summary.skipped_existing = sum(counts.skipped_existing for counts in per_process)
        summary.failed = {i: failed[i] for i in ids if i in failed}  # in list order, however the ranks split them
        summary.processes = len(per_process)
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
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader worker processes per device process; 1 = none (default: all CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing PNGs")
    parser.add_argument("--skip-missing", action="store_true", help="leave out ids without a CAM file (counted and reported) instead of failing")
    parser.add_argument("--key", default=None, help="array of the CAM file to use (default: cams / IRN high_res), e.g. a per-layer map")
    parser.add_argument("--n-segments", type=int, default=None, help=f"SLIC n_segments (default {SLIC_DEFAULTS['n_segments']})")
    parser.add_argument("--compactness", type=_finite, default=None, help=f"SLIC compactness (default {SLIC_DEFAULTS['compactness']})")
    parser.add_argument("--sigma", type=_finite, default=None, help=f"SLIC Gaussian pre-smoothing (default {SLIC_DEFAULTS['sigma']})")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu; the work is NumPy/scikit-image)")
    parser.add_argument("--devices", default="1", help="Lightning devices, e.g. 2 with --strategy ddp: each image is done by exactly one process")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
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
        {i: layout.image_path(i) for i in ids}, args.cams, args.out, params, workers=args.workers, skip_missing=args.skip_missing,
        accelerator=args.accelerator, devices=parse_devices(args.devices), strategy=args.strategy,
    )
    if not is_global_zero():  # the summary holds every process's totals; one process reports them
        return 0
    print(f"pseudo-labels -> {args.out}: {summary.line()}")
    if summary.skipped_missing:
        print(f"ids without a CAM file (skipped): {name_some(summary.skipped_missing)}")
    if summary.failed:
        messages = list(summary.failed.values())
        raise DataError(f"{len(messages)} images failed (nothing partial was written):\n  " + "\n  ".join(messages[:MAX_NAMED])
                        + (f"\n  ... and {len(messages) - MAX_NAMED} more" if len(messages) > MAX_NAMED else ""))
    return 0
