"""Stage 3: pseudo-labels from images + CAM files (``wsss pseudo-labels``).

One PNG per image (values 0..20; VOC palette, or 8-bit grayscale with ``png_mode="gray"``) by
eq. 10 superpixel voting (:mod:`wsss.pseudo`). This module is plumbing only: a resumable loop over
images (a Lightning predict loop, so it runs under DDP like ``wsss cams``), atomic writes and a
summary. CAM files of any layout (ours, IRN's, PSA's) are read by
:func:`wsss.formats.cams.read_cams`.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from wsss.classes import LABEL_SETS, NUM_CLASSES, LabelSet
from wsss.crf import CRF_INSTALL_HINT, crf_available
from wsss.data import open_layout
from wsss.data.modules import PredictDataModule
from wsss.errors import MAX_NAMED, ConfigError, DataError, name_some
from wsss.formats.cams import find_cam_files, read_cams
from wsss.formats.images import image_size, read_image
from wsss.formats.label_png import PNG_MODE_HELP, PNG_MODES, is_valid_label_png, label_pngs_in, write_label_png
from wsss.io import ensure_output_dir
from wsss.options import (OptionError, add_options, check_choices, check_range, default_workers, option, options_from_args,
                          parse_stage_args, resource_values, result_params)
from wsss.pseudo import DEFAULT_THRESHOLD, SLIC_DEFAULTS, crf_scores, superpixel_labels
from wsss.records import claim_folder, folder_identity
from wsss.systems.predictors import PassThroughPredictor
from wsss.systems.writers import PseudoLabelWriter
from wsss.trainers import gather_objects, is_global_zero, parse_devices, predict_trainer

log = logging.getLogger(__name__)


def make_pseudo_label(image_path: Path, cam_path: Path, out_path: Path | None, threshold: float = DEFAULT_THRESHOLD,
                      key: str | None = None, ignore_below: float | None = None, crf: bool = False, png_mode: str = "palette",
                      num_classes: int = NUM_CLASSES, **slic_kwargs: Any) -> np.ndarray:
    """Load an image and its CAM file, vote per superpixel (eq. 10; superpixels scored in
    [``threshold``, ``ignore_below``) left at 255; with ``crf``, on the dense-CRF marginals of
    the scores, :func:`wsss.pseudo.crf_scores`), write ``out_path`` atomically as a ``png_mode``
    (``palette`` or ``gray``) PNG.

    ``num_classes``: the dataset's foreground classes (VOC 20, COCO 80), the largest class value a CAM file may hold.
    Returns the (H, W) uint8 label map. ``out_path=None`` skips writing (sweeps, tests).
    Raises DataError naming the file on any input problem.
    """
    image = read_image(image_path)
    cams, classes = read_cams(cam_path, key, image_size=image.shape[:2], num_classes=num_classes)
    if cams.shape[1:] != image.shape[:2]:
        raise DataError(
            f"{cam_path}: maps have spatial shape {tuple(cams.shape[1:])} but image {image_path.name} "
            f"is {image.shape[0]}x{image.shape[1]} (CAMs must be at the original image size)"
        )
    if crf:
        scores = crf_scores(image, cams, threshold)
        label_map = superpixel_labels(image, scores[1:], classes, threshold=threshold, background=scores[0], **slic_kwargs)
    else:
        label_map = superpixel_labels(image, cams, classes, threshold=threshold, ignore_below=ignore_below, **slic_kwargs)
    if out_path is not None:
        write_label_png(out_path, label_map, png_mode)
    return label_map


@dataclass(frozen=True)
class PseudoLabelJob:
    """One image: its id, image, CAM file and output PNG."""

    image_id: str
    image_path: Path
    cam_path: Path
    out_path: Path


@dataclass(frozen=True)
class PseudoLabelOptions:
    """How every image's CAMs become its label map (eq. 10 and the options beyond it), and the
    resources. Every value is checked here."""

    threshold: float = option(DEFAULT_THRESHOLD, "background threshold on a superpixel's mean CAM score, in [0, 1]")
    ignore_below: float | None = option(None, "superpixels whose best score is at least the threshold but below this are left "
                                        "unlabelled (255), which the segmenter ignores (none: the paper's rule labels every pixel)")
    crf: bool = option(False, f"vote on dense-CRF marginals of [threshold, CAM scores] ({CRF_INSTALL_HINT})")
    n_segments: int | None = option(None, f"SLIC n_segments (none: {SLIC_DEFAULTS['n_segments']})")
    compactness: float | None = option(None, f"SLIC compactness (none: {SLIC_DEFAULTS['compactness']})")
    sigma: float | None = option(None, f"SLIC Gaussian pre-smoothing (none: {SLIC_DEFAULTS['sigma']})")
    png_mode: str = option("palette", PNG_MODE_HELP, choices=PNG_MODES)
    workers: int = option(1, "DataLoader worker processes per device process; 1 = none", neutral=True)
    accelerator: str = option("cpu", "Lightning accelerator (the work is NumPy/scikit-image)", neutral=True)
    devices: int | str = option(1, "Lightning devices, e.g. 2 with --strategy ddp: each image is done by exactly one process",
                                neutral=True, parse=parse_devices)

    def __post_init__(self):
        check_choices(self)
        check_range("threshold", self.threshold, 0, 1)
        self.check_band(self.band_floor())
        if self.crf and self.ignore_below is not None:
            raise OptionError("crf", "cannot be combined with ignore_below (the band is on the constant threshold the CRF replaces)")
        check_range("n_segments", self.n_segments, 1)
        check_range("compactness", self.compactness, 0, low_open=True)
        check_range("sigma", self.sigma, 0)
        check_range("workers", self.workers, 1)

    def band_floor(self) -> float:
        """What ``ignore_below`` must lie above."""
        return self.threshold

    def check_band(self, threshold: float) -> None:
        """OptionError unless the uncertain band [``threshold``, ``ignore_below``) is one."""
        if self.ignore_below is not None:
            check_range("ignore_below", self.ignore_below, 0, 1)
            if self.ignore_below <= threshold:
                raise OptionError("ignore_below", f"must be above the threshold ({threshold:g}), got {self.ignore_below:g}")

    @property
    def slic(self) -> dict[str, Any]:
        """Every SLIC setting, defaults filled in."""
        given = {"n_segments": self.n_segments, "compactness": self.compactness, "sigma": self.sigma}
        return {**SLIC_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


def pseudo_label_params(options: PseudoLabelOptions, key: str | None) -> dict[str, Any]:
    """A pseudo-label folder's recorded parameters: the options that change labels, SLIC resolved."""
    params = {k: v for k, v in result_params(options).items() if k not in ("n_segments", "compactness", "sigma")}
    return {**params, "slic": options.slic, "key": key}


@dataclass
class PseudoLabelSummary:
    """What a run did, totals over every process; ``failed`` maps id -> error message."""

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

    def raise_for_failures(self) -> None:
        """DataError listing the failed images' messages, if any failed."""
        if self.failed:
            messages = list(self.failed.values())
            raise DataError(f"{len(messages)} images failed (nothing partial was written):\n  " + "\n  ".join(messages[:MAX_NAMED])
                            + (f"\n  ... and {len(messages) - MAX_NAMED} more" if len(messages) > MAX_NAMED else ""))


class PseudoLabelDataset(Dataset):
    """Item i: image i's label map, or why it has none (the work runs in DataLoader workers).

    ``{"id", "status": "labelled" | "skipped" | "failed", "label_map": (H, W) uint8 or None, "message"}``;
    ``skipped`` means a valid PNG of the right size and ``png_mode`` is already there (kept unless
    ``overwrite``; one of the other mode is redone).
    Input errors (DataError) become ``failed`` items, so one bad file does not stop the run.
    """

    def __init__(self, jobs: Sequence[PseudoLabelJob], options: PseudoLabelOptions, key: str | None = None, overwrite: bool = False,
                 labels: LabelSet = LABEL_SETS["voc"]):
        self.jobs, self.options, self.key, self.overwrite, self.labels = list(jobs), options, key, overwrite, labels

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        job, options = self.jobs[index], self.options
        item: dict[str, Any] = {"id": job.image_id, "status": "skipped", "label_map": None, "message": ""}
        try:
            if not self.overwrite and job.out_path.exists() and is_valid_label_png(job.out_path, image_size(job.image_path), options.png_mode, self.labels):
                return item
            item["label_map"] = make_pseudo_label(job.image_path, job.cam_path, None, options.threshold, self.key, options.ignore_below,
                                                   options.crf, num_classes=self.labels.num_labels - 1, **options.slic)
            item["status"] = "labelled"
        except DataError as exc:
            item.update(status="failed", message=str(exc))
        return item


def make_pseudo_labels(
    data_root: str | Path,
    cam_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train_aug",
    options: PseudoLabelOptions = PseudoLabelOptions(),
    key: str | None = None,
    overwrite: bool = False,
    skip_missing: bool = False,
    progress: bool = True,
    strategy: str = "auto",
) -> PseudoLabelSummary:
    """Write ``out_dir/<id>.png`` for every image of ``split`` from its CAM file in ``cam_dir``
    (``key``: the array of the CAM file to use; default its fused maps).

    Validates up front that every listed id has a CAM file (all missing ids reported in one
    DataError unless ``skip_missing``). The folder records the options and the CAM folder it was
    made from (:mod:`wsss.records`): existing valid PNGs are kept when both are the same, a folder
    made otherwise is refused unless ``overwrite`` (which redoes every PNG). Per-image input
    errors do not stop the run; they are collected in the summary (the caller decides whether that
    is fatal: :meth:`PseudoLabelSummary.raise_for_failures`). ``options.workers`` DataLoader
    worker processes per process (none when 1); under DDP (``options.devices``, ``strategy``) each
    image is done by exactly one process and the summary holds the totals of all of them.
    """
    if options.crf and not crf_available():
        raise ConfigError(f"pseudo-labels with a dense CRF: {CRF_INSTALL_HINT}")
    start = time.perf_counter()
    layout = open_layout(data_root)
    ids = layout.read_ids(split)
    layout.check_images(ids)
    out_dir = ensure_output_dir(out_dir)
    cam_files, missing = find_cam_files(Path(cam_dir), ids)
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(ids)} listed ids have no CAM file (<id>.npz or <id>.npy) in {cam_dir}: "
            f"{name_some(missing)} (pass --skip-missing to leave them out)"
        )
    claim_folder(out_dir, "pseudo-labels", pseudo_label_params(options, key), {"cams": folder_identity(cam_dir)}, overwrite=overwrite,
                 existing=label_pngs_in(out_dir), what="label PNGs", writer=is_global_zero(),
                 resources=resource_values(options),
                 sources={"cams": Path(cam_dir).resolve(), "data_root": layout.root})
    jobs = [PseudoLabelJob(i, layout.image_path(i), cam_files[i], out_dir / f"{i}.png") for i in ids if i in cam_files]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = PseudoLabelSummary(skipped_missing=missing)
    if jobs:
        workers = options.workers
        log.info("%d images from %s; SLIC %s; threshold %g; %d workers", len(jobs), split, options.slic, options.threshold, workers)
        writer = PseudoLabelWriter(out_dir, options.png_mode)
        trainer = predict_trainer(writer, options.accelerator, options.devices, strategy, progress)
        data = PredictDataModule(PseudoLabelDataset(jobs, options, key, overwrite, layout.labels), batch_size=1, num_workers=workers if workers > 1 else 0,
                                 collate_fn=list)
        trainer.predict(PassThroughPredictor(), datamodule=data, return_predictions=False)
        per_process = gather_objects(trainer, (writer.written, writer.skipped, writer.failed))
        failed = {image_id: message for _, _, process_failed in per_process for image_id, message in process_failed.items()}
        summary.written = sum(written for written, _, _ in per_process)
        summary.skipped_existing = sum(skipped for _, skipped, _ in per_process)
        summary.failed = {i: failed[i] for i in ids if i in failed}  # in list order, however the ranks split them
        summary.processes = len(per_process)
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv: list[str]) -> int:
    """``wsss pseudo-labels``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss pseudo-labels",
        description="Images + CAM files -> OUT/<id>.png VOC-palette pseudo-labels (SLIC superpixel voting, "
        "LayerCAM eq. 10). Resumable: existing valid PNGs made with the same settings are kept unless --overwrite.",
    )
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz (or IRN's / PSA's <id>.npy) CAM files")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <id>.png")
    parser.add_argument("--split", default="train_aug", help="split name or list file (default: train_aug)")
    parser.add_argument("--key", default=None, help="array of the CAM file to use (default: cams / IRN high_res), e.g. a per-layer map")
    add_options(parser, PseudoLabelOptions)
    parser.set_defaults(workers=default_workers())  # a command of its own may use every CPU
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing PNGs (and replace a folder made with other settings)")
    parser.add_argument("--skip-missing", action="store_true", help="leave out ids without a CAM file (counted and reported) instead of failing")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    args = parse_stage_args(parser, argv, PseudoLabelOptions)
    options = options_from_args(PseudoLabelOptions, args)
    summary = make_pseudo_labels(args.data_root, args.cams, args.out, split=args.split, options=options, key=args.key,
                                 overwrite=args.overwrite, skip_missing=args.skip_missing, strategy=args.strategy)
    if not is_global_zero():  # the summary holds every process's totals; one process reports them
        return 0
    print(f"pseudo-labels -> {args.out}: {summary.line()}")
    if summary.skipped_missing:
        print(f"ids without a CAM file (skipped): {name_some(summary.skipped_missing)}")
    summary.raise_for_failures()
    return 0
