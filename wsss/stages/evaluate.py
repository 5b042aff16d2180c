"""Evaluation of label maps: ``wsss evaluate`` (any folder of label PNGs against GT masks).

One confusion matrix is summed over the whole split with :func:`wsss.metrics.confusion_matrix`
and turned into scores with :func:`wsss.metrics.scores_from_confusion` (SPEC "Evaluation");
nothing here counts pixels or divides by itself.

Conventions: GT pixels labelled 255 are ignored. A *prediction* pixel labelled 255 (a pseudo-label
method's "don't know") is scored as background 0, the field's convention for evaluating
pseudo-labels (IRN, AMN, ...): every non-ignored GT pixel is counted, so leaving pixels undecided is
not rewarded; :class:`LabelScores` adds the scores on the labelled pixels alone and their share,
for methods that leave uncertain pixels unlabelled. Predictions may be index (``L``) or palette
(``P``) PNGs; palette colours are ignored.
"""
from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.classes import IGNORE_INDEX, LABEL_SETS, LabelSet, label_set
from wsss.errors import DataError, name_some
from wsss.formats.label_png import list_label_ids, missing_label_pngs, read_label_png
from wsss.io import write_json
from wsss.metrics import SegmentationScores, confusion_matrix, scores_from_confusion
from wsss.options import parse_stage_args
from wsss.parallel import sum_in_chunks
from wsss.stages import options

log = logging.getLogger(__name__)


def pair_confusion(pred_path: Path, gt_path: Path, labels: LabelSet = LABEL_SETS["voc"]) -> np.ndarray:
    """(L, L + 1) confusion of one prediction PNG vs its GT mask (L = ``labels.num_labels``, 21 for
    VOC): columns 0..L-1 the predicted labels, column L the pixels the prediction leaves unlabelled
    (255 or ``labels.ignore``); GT ``labels.ignore`` left out."""
    pred = read_label_png(pred_path, labels=labels)
    gt = read_label_png(gt_path, labels=labels)
    if pred.shape != gt.shape:
        raise DataError(f"{pred_path}: prediction is {pred.shape[0]}x{pred.shape[1]} but GT {gt_path} is {gt.shape[0]}x{gt.shape[1]}")
    unlabelled = labels.num_labels
    # 255, and the label set's own ignore value where it is another, both mean "left unlabelled".
    pred = np.where((pred == IGNORE_INDEX) | (pred == labels.ignore), np.uint8(unlabelled), pred)
    return confusion_matrix(pred, gt, unlabelled + 1, labels.ignore)[:unlabelled]


def _confusion_of_chunk(pairs: list[tuple[Path, Path]], labels: LabelSet) -> tuple[int, np.ndarray]:
    empty = np.zeros((labels.num_labels, labels.num_labels + 1), np.int64)
    return len(pairs), sum((pair_confusion(pred, gt, labels) for pred, gt in pairs), empty)


@dataclass(frozen=True)
class LabelScores:
    """Scores of label maps that may leave pixels unlabelled (255).

    ``scores``: the field's convention, an unlabelled pixel counted as background; ``labelled``:
    the same scores over the labelled pixels only (the labels' precision); ``labelled_share``: the
    fraction of the GT's non-ignored pixels the maps label."""

    scores: SegmentationScores
    labelled: SegmentationScores
    labelled_share: float

    @classmethod
    def from_confusion(cls, confusion: np.ndarray, background: int = 0) -> LabelScores:
        """From an (L, L + 1) confusion whose last column counts unlabelled pixels."""
        num_labels = confusion.shape[0]
        as_background = confusion[:, :num_labels].copy()
        as_background[:, background] += confusion[:, num_labels]
        total = confusion.sum()
        return cls(scores_from_confusion(as_background), scores_from_confusion(confusion[:, :num_labels]),
                   float(1 - confusion[:, num_labels].sum() / total) if total else float("nan"))


def evaluate_label_maps(
    pred_dir: str | Path,
    gt_dir: str | Path,
    ids: Sequence[str],
    workers: int = 1,
    skip_missing: bool = False,
    chunk_size: int = 32,
    progress: bool = False,
    labels: str | Path | LabelSet = "voc",
) -> LabelScores:
    """:class:`LabelScores` of ``pred_dir/<id>.png`` against ``gt_dir/<id>.png`` over ``ids``, from
    one confusion summed over the split.

    Args:
        pred_dir: predictions (index or palette PNGs, values 0..20 or 255 = unlabelled).
        gt_dir: ground-truth masks (255 ignored).
        ids: image ids to evaluate.
        workers: decoding processes.
        skip_missing: leave out ids without a prediction (logged) instead of raising.
        labels: the dataset's label set (:func:`wsss.classes.label_set`: ``voc``, ``coco`` or a file).

    Raises:
        DataError naming the file: missing GT or prediction, size mismatch, bad values.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    ids = list(ids)
    if not ids:
        raise DataError("no image ids to evaluate")
    missing_gt = missing_label_pngs(gt_dir, ids)
    if missing_gt:
        raise DataError(f"{len(missing_gt)} ids have no GT mask in {gt_dir}: {name_some(missing_gt)}")
    missing = missing_label_pngs(pred_dir, ids)
    if missing and not skip_missing:
        raise DataError(f"{len(missing)} of {len(ids)} ids have no prediction in {pred_dir}: {name_some(missing)}")
    if missing:
        log.warning("%d ids without a prediction in %s are left out", len(missing), pred_dir)
        absent = set(missing)  # one set, not one per id (train_aug: 10,582 ids)
        ids = [i for i in ids if i not in absent]
        if not ids:
            raise DataError(f"no prediction in {pred_dir} for any of the listed ids")
    pairs = [(pred_dir / f"{i}.png", gt_dir / f"{i}.png") for i in ids]
    labels = label_set(labels)
    confusion = sum_in_chunks(functools.partial(_confusion_of_chunk, labels=labels), pairs, workers, chunk_size, "evaluate", progress)
    return LabelScores.from_confusion(confusion, labels.background)


def evaluate_labels(pred_dir: str | Path, gt_dir: str | Path, ids: Sequence[str], **kwargs) -> SegmentationScores:
    """The field's scores of a folder of label maps (unlabelled pixels counted as background):
    ``evaluate_label_maps(...).scores``, with the same arguments."""
    return evaluate_label_maps(pred_dir, gt_dir, ids, **kwargs).scores


def main(argv: list[str]) -> int:
    """``wsss evaluate``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss evaluate",
        description="Per-class IoU, mIoU and pixel accuracy of a folder of label PNGs against GT masks "
        "(one confusion matrix over all images; GT 255 ignored; prediction 255 scored as background).",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of <id>.png predictions (index or palette PNGs)")
    parser.add_argument("--gt", required=True, type=Path, help="folder of <id>.png GT masks (e.g. VOC2012/SegmentationClass)")
    parser.add_argument("--skip-missing", action="store_true", help="leave out ids without a prediction (reported) instead of failing")
    options.add_label_set_argument(parser)
    options.add_evaluation_arguments(parser, list_help="file of ids to evaluate (default: every PNG in --gt)",
                                     json_help="also write the scores to this JSON file", workers_help="decoding processes (default: all CPUs)")
    args = parse_stage_args(parser, argv)
    options.check_evaluation_arguments(args)

    start = time.perf_counter()
    ids = options.listed_ids(args.list, args.gt, list_label_ids, "png")
    missing = missing_label_pngs(args.pred, ids)
    if missing and not args.skip_missing:
        raise DataError(f"{len(missing)} of {len(ids)} ids have no prediction in {args.pred}: {name_some(missing)} "
                        "(pass --skip-missing to leave them out)")
    absent = set(missing)
    present = [i for i in ids if i not in absent]
    labels = label_set(args.label_set)
    label_scores = evaluate_label_maps(args.pred, args.gt, present, workers=args.workers, progress=True, labels=labels)
    scores = label_scores.scores
    print(scores.table(labels.names))
    if label_scores.labelled_share < 1:
        print(f"the predictions label {100 * label_scores.labelled_share:.1f}% of the pixels (255 elsewhere, counted as background "
              f"above); on the labelled pixels: mIoU {100 * label_scores.labelled.miou:.2f}, "
              f"pixel accuracy {100 * label_scores.labelled.pixel_accuracy:.2f}")
    print(f"{len(present)} images evaluated in {time.perf_counter() - start:.1f}s"
          + (f"; {len(missing)} skipped (no prediction): {name_some(missing)}" if missing else ""))
    if args.json is not None:
        payload = {
            **scores.to_dict(labels.names),
            "label_set": labels.name,
            "num_images": len(present),
            "skipped_missing": missing,
            "pred_dir": str(args.pred),
            "gt_dir": str(args.gt),
            "convention": "GT 255 ignored; prediction 255 scored as background (0)",
            "labelled_share": label_scores.labelled_share,
            "labelled": label_scores.labelled.to_dict(labels.names),
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
