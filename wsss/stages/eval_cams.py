"""Evaluation of CAMs: ``wsss eval-cams`` (CAM seeds against GT masks over a background-threshold sweep).

The seed of a pixel is argmax over [background = threshold, the image's class maps]
(:func:`wsss.pseudo.seed_labels_from_best`); one confusion matrix per threshold is summed over the
split with :func:`wsss.metrics.confusion_matrix` (SPEC "Evaluation"). GT 255 is ignored.
"""
from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.classes import LABEL_SETS, LabelSet, label_set
from wsss.errors import ConfigError, DataError, name_some
from wsss.formats.cams import find_cam_files, list_cam_ids, read_cams
from wsss.formats.label_png import missing_label_pngs, read_label_png
from wsss.io import write_json
from wsss.metrics import SegmentationScores, confusion_matrix, scores_from_confusion
from wsss.options import OptionError, add_options, check_range, option, options_from_args, parse_stage_args
from wsss.parallel import sum_in_chunks
from wsss.pseudo import DEFAULT_THRESHOLD, cam_best_class, seed_labels_from_best
from wsss.stages import options


def parse_thresholds(text: str) -> list[float]:
    """``start:stop:step`` (stop included) or ``a,b,c`` in [0, 1]; 0.3 is always added. Sorted,
    rounded to 1e-6. OptionError (``thresholds``) otherwise."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-6)) + 1
            values = [start + i * step for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError("thresholds", f"must be START:STOP:STEP (STEP > 0) or a comma list, got {text!r}") from None
    if not values or not all(np.isfinite(values)) or min(values) < 0 or max(values) > 1:
        raise OptionError("thresholds", f"must be numbers in [0, 1], got {text!r}")
    return sorted({round(v, 6) for v in [*values, DEFAULT_THRESHOLD]})


@dataclass(frozen=True)
class EvalCamsOptions:
    """The background thresholds of a seed sweep, and the workers. Checked here."""

    thresholds: str = option("0.05:0.95:0.05", "START:STOP:STEP (STOP included) or a comma list, in [0, 1]; 0.3 is always added")
    workers: int = option(1, "worker processes", neutral=True)

    def __post_init__(self):
        parse_thresholds(self.thresholds)
        check_range("workers", self.workers, 1)


def _cam_confusions(pairs: list[tuple[Path, Path]], thresholds: list[float], key: str | None,
                    labels: LabelSet = LABEL_SETS["voc"]) -> tuple[int, np.ndarray]:
    """(T, L, L) summed confusion of a chunk of (CAM file, GT mask) pairs, one per threshold (L = 21 for VOC)."""
    num_labels = labels.num_labels
    total = np.zeros((len(thresholds), num_labels, num_labels), dtype=np.int64)
    for cam_path, gt_path in pairs:
        gt = read_label_png(gt_path, labels=labels)
        cams, classes = read_cams(cam_path, key, image_size=gt.shape, num_classes=num_labels - 1)
        if cams.shape[1:] != gt.shape:
            raise DataError(f"{cam_path}: maps have spatial shape {tuple(cams.shape[1:])} but GT {gt_path} is {gt.shape[0]}x{gt.shape[1]}")
        best_score, best_label = cam_best_class(cams, classes)  # once per image, reused per threshold
        for t, threshold in enumerate(thresholds):
            total[t] += confusion_matrix(seed_labels_from_best(best_score, best_label, threshold), gt, num_labels, labels.ignore)
    return len(pairs), total


def evaluate_cams(
    cam_dir: str | Path,
    gt_dir: str | Path,
    ids: Sequence[str],
    thresholds: Sequence[float],
    key: str | None = None,
    workers: int = 1,
    chunk_size: int = 16,
    progress: bool = False,
    labels: str | Path | LabelSet = "voc",
) -> dict[float, SegmentationScores]:
    """Seed quality of CAM files: for each background threshold, scores of
    argmax([threshold, cams...]) against the GT masks, one confusion summed over ``ids``.

    ``key`` selects another (K, H, W) array of the npz (e.g. a per-layer map ``stage3``, or
    ``stage4+stage5``). Returns ``{threshold: scores}`` in the order of ``thresholds``.
    ``labels``: the masks' label set (:func:`wsss.classes.label_set`; its background must be 0,
    the value seeds give it). Raises DataError naming the file for missing CAMs/GT and malformed
    CAM files.
    """
    cam_dir, gt_dir = Path(cam_dir), Path(gt_dir)
    ids = list(ids)
    thresholds = [float(t) for t in thresholds]
    if not ids:
        raise DataError("no image ids to evaluate")
    if not thresholds:
        raise ConfigError("no thresholds given")
    cam_files, missing = find_cam_files(cam_dir, ids)
    if missing:
        raise DataError(f"{len(missing)} of {len(ids)} ids have no CAM file (<id>.npz or <id>.npy) in {cam_dir}: {name_some(missing)}")
    missing_gt = missing_label_pngs(gt_dir, ids)
    if missing_gt:
        raise DataError(f"{len(missing_gt)} ids have no GT mask in {gt_dir}: {name_some(missing_gt)}")
    pairs = [(cam_files[i], gt_dir / f"{i}.png") for i in ids]
    labels = label_set(labels)
    if labels.background != 0:
        raise ConfigError(f"label set {labels.name!r}: CAM seeds label background 0, the set's background is {labels.background}")
    count = functools.partial(_cam_confusions, thresholds=thresholds, key=key, labels=labels)
    total = sum_in_chunks(count, pairs, workers, chunk_size, "eval-cams", progress)
    return {t: scores_from_confusion(c) for t, c in zip(thresholds, total)}


def best_threshold(results: dict[float, SegmentationScores]) -> float:
    """Threshold with the highest mIoU (the lowest such threshold on ties)."""
    return max(results, key=lambda t: (np.nan_to_num(results[t].miou, nan=-1.0), -t))


def threshold_table(results: dict[float, SegmentationScores]) -> str:
    """Plain-text table: threshold, mIoU %, pixel accuracy %, best row and 0.3 marked."""
    best = best_threshold(results)
    lines = [f"{'threshold':>9}  {'mIoU %':>7}  {'pixel acc %':>11}"]
    for t, scores in results.items():
        marks = [m for m, on in (("best", t == best), ("eq. 10 default", t == DEFAULT_THRESHOLD)) if on]
        lines.append(f"{t:>9.3f}  {100 * scores.miou:>7.2f}  {100 * scores.pixel_accuracy:>11.2f}" + (f"  <- {', '.join(marks)}" if marks else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``wsss eval-cams``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss eval-cams",
        description="Seed mIoU of CAM files against GT masks over a background-threshold sweep: "
        "background score = threshold, label = argmax over background and the image's class maps.",
    )
    parser.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz (or IRN's / PSA's <id>.npy) CAM files")
    parser.add_argument("--gt", required=True, type=Path, help="folder of <id>.png GT masks")
    parser.add_argument("--key", default=None, help="array to evaluate instead of 'cams', e.g. a per-layer map 'stage3'")
    add_options(parser, EvalCamsOptions, skip=("workers",))
    options.add_label_set_argument(parser)
    options.add_evaluation_arguments(parser, list_help="file of ids (default: every CAM file in --cams)",
                                     json_help="also write per-threshold scores to this JSON file", workers_help="worker processes (default: all CPUs)")
    args = parse_stage_args(parser, argv, EvalCamsOptions)
    options.check_evaluation_arguments(args)
    thresholds = parse_thresholds(options_from_args(EvalCamsOptions, args).thresholds)

    start = time.perf_counter()
    ids = options.listed_ids(args.list, args.cams, list_cam_ids, "CAM")
    labels = label_set(args.label_set)
    results = evaluate_cams(args.cams, args.gt, ids, thresholds, key=args.key, workers=args.workers, progress=True, labels=labels)
    best = best_threshold(results)
    print(threshold_table(results))
    print(f"{len(ids)} images ({args.key or 'cams'}) in {time.perf_counter() - start:.1f}s; best threshold {best:g}: "
          f"mIoU {100 * results[best].miou:.2f}%; at {DEFAULT_THRESHOLD:g}: {100 * results[DEFAULT_THRESHOLD].miou:.2f}%")
    if args.json is not None:
        payload = {
            "key": args.key or "cams",
            "num_images": len(ids),
            "best_threshold": best,
            "label_set": labels.name,
            "best_miou": results[best].to_dict(labels.names)["miou"],
            "thresholds": [{"threshold": t, **s.to_dict(labels.names)} for t, s in results.items()],
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
