"""Segmentation scores from one confusion matrix, used by every stage that reports mIoU.

Counts are summed over the whole split (and, under DDP, over processes) *before* any division:
the mIoU of a split is never an average of per-image or per-process IoUs. The confusion matrix
has ground truth on rows and prediction on columns: ``confusion[t, p]`` counts pixels of class
``t`` predicted as ``p``.

- :func:`count_confusion` is the only place pixels are counted (one ``torch.bincount``);
  :func:`confusion_matrix` is its NumPy-facing wrapper and :class:`SegmentationMetric` its
  torchmetrics state holder.
- :func:`scores_from_confusion` turns any (summed) confusion matrix into :class:`SegmentationScores`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torchmetrics import Metric

from wsss.classes import IGNORE_INDEX, LABEL_NAMES, NUM_LABELS

LabelMap = Union[torch.Tensor, np.ndarray]


def _as_label_tensor(x: LabelMap, name: str) -> torch.Tensor:
    """View ``x`` as an integer tensor without copying when possible."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer labels, got NumPy dtype {x.dtype}")
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:
            # torch has only partial support for uint16/32/64; widen once here.
            x = x.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must hold integer labels, got torch dtype {x.dtype}")
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _bad_values(values: torch.Tensor, limit: int = 8) -> list[int]:
    """A few offending values, for error messages."""
    return torch.unique(values)[:limit].tolist()


def count_confusion(
    pred: LabelMap,
    target: LabelMap,
    num_classes: int = NUM_LABELS,
    ignore_index: int | None = IGNORE_INDEX,
) -> torch.Tensor:
    """Count the (num_classes, num_classes) int64 confusion matrix of one batch of label maps.

    Args:
        pred: predicted labels, any shape, integer dtype, every value in ``0..num_classes-1``.
        target: ground-truth labels of the same shape; values in ``0..num_classes-1`` or
            ``ignore_index`` (those pixels are skipped whatever ``pred`` says there).
        num_classes: number of classes C.
        ignore_index: target value to skip, or None.

    Returns:
        ``confusion[t, p]`` on ``pred``'s device.

    Raises:
        ValueError: on shape mismatch, non-integer dtypes or out-of-range values.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred = _as_label_tensor(pred, "pred")
    target = _as_label_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).to(pred.device).long()
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        bad = pred[(pred < 0) | (pred >= num_classes)]
        raise ValueError(
            f"pred values must be in 0..{num_classes - 1}, found {_bad_values(bad)}"
            " (map ignored/unknown pixels of a prediction to a class before scoring it)"
        )
    if ignore_index is not None:
        valid = target != ignore_index
        pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)]
        raise ValueError(
            f"target values must be in 0..{num_classes - 1} or ignore_index={ignore_index}, "
            f"found {_bad_values(bad)}"
        )
    # One pass: the pair (t, p) maps to the flat bin t * C + p.
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def confusion_matrix(
    pred: LabelMap,
    target: LabelMap,
    num_classes: int = NUM_LABELS,
    ignore_index: int | None = IGNORE_INDEX,
) -> np.ndarray:
    """:func:`count_confusion` for NumPy callers: returns a (C, C) int64 ``numpy.ndarray``."""
    return count_confusion(pred, target, num_classes, ignore_index).cpu().numpy()


@dataclass(eq=False)  # not frozen: torchmetrics' compute wrapper rebuilds dataclass results
class SegmentationScores:
    """Scores of one confusion matrix.

    Attributes:
        confusion: (C, C) int64 counts, ground truth on rows, prediction on columns.
        iou: (C,) float64 per-class IoU; NaN where the class is absent from both prediction and
            ground truth (empty union), since such a class has no defined IoU.
        miou: mean of ``iou`` over classes with a non-empty union (NaN if there is none).
        pixel_accuracy: correctly labelled / counted pixels (NaN if no pixel was counted).
    """

    confusion: np.ndarray
    iou: np.ndarray
    miou: float
    pixel_accuracy: float

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def num_pixels(self) -> int:
        return int(self.confusion.sum())

    def _check_names(self, names: Sequence[str]) -> None:
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for {self.num_classes} classes")

    def to_dict(self, names: Sequence[str] = LABEL_NAMES) -> dict[str, Any]:
        """JSON-ready dict: fractions in [0, 1], per-class IoU keyed by name, NaN written as None."""
        self._check_names(names)

        def num(value: float) -> float | None:
            return None if np.isnan(value) else float(value)

        return {
            "miou": num(self.miou),
            "pixel_accuracy": num(self.pixel_accuracy),
            "iou": {name: num(v) for name, v in zip(names, self.iou)},
            "num_pixels": self.num_pixels,
            "confusion": self.confusion.tolist(),
        }

    def table(self, names: Sequence[str] = LABEL_NAMES) -> str:
        """Plain-text table of per-class IoU, mIoU and pixel accuracy, in percent."""
        self._check_names(names)
        width = max(len("pixel accuracy"), *(len(n) for n in names))

        def pct(value: float) -> str:
            return "n/a" if np.isnan(value) else f"{100 * value:.2f}"

        lines = [f"{'class':<{width}}  {'IoU %':>7}"]
        lines += [f"{name:<{width}}  {pct(v):>7}" for name, v in zip(names, self.iou)]
        lines.append("-" * (width + 9))
        lines.append(f"{'mIoU':<{width}}  {pct(self.miou):>7}")
        lines.append(f"{'pixel accuracy':<{width}}  {pct(self.pixel_accuracy):>7}")
        return "\n".join(lines)


def scores_from_confusion(confusion: np.ndarray | torch.Tensor) -> SegmentationScores:
    """Per-class IoU, mIoU and pixel accuracy of a (C, C) confusion matrix (rows: ground truth).

    IoU_c = TP_c / (TP_c + FP_c + FN_c). Classes with an empty union (absent from prediction and
    ground truth) get NaN and are left out of the mean, unlike torchmetrics' ``JaccardIndex``,
    which scores them 0.
    """
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    conf = np.asarray(confusion)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] == 0:
        raise ValueError(f"confusion must be a non-empty square matrix, got shape {conf.shape}")
    if conf.dtype.kind not in "iu":
        raise ValueError(f"confusion must hold integer counts, got dtype {conf.dtype}")
    if (conf < 0).any():
        raise ValueError("confusion has negative counts")
    conf = conf.astype(np.int64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = union > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = conf.sum()
    pixel_accuracy = float(tp.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(confusion=conf, iou=iou, miou=miou, pixel_accuracy=pixel_accuracy)


class SegmentationMetric(Metric):
    """torchmetrics wrapper around :func:`count_confusion`.

    The state is the summed confusion matrix (``dist_reduce_fx="sum"``), so under DDP counts are
    summed across processes and only then turned into scores. ``compute()`` returns tensors, as
    torchmetrics metrics do: ``{"mIoU": scalar, "pixel_accuracy": scalar, "iou": per class (NaN for
    a class in neither), "confusion": the summed counts}``, so the scalars log with ``log_dict``;
    :meth:`scores` gives the same as :class:`SegmentationScores` for tables and reports.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confusion: torch.Tensor

    def __init__(
        self, num_classes: int = NUM_LABELS, ignore_index: int | None = IGNORE_INDEX, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, pred: LabelMap, target: LabelMap) -> None:  # type: ignore[override]
        """Add the counts of label maps ``pred`` and ``target`` (same shape, any shape)."""
        counts = count_confusion(pred, target, self.num_classes, self.ignore_index)
        self.confusion += counts.to(self.confusion.device)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Scores of everything seen since the last ``reset()`` (float64; under DDP of every process)."""
        scores = scores_from_confusion(self.confusion)
        return {"mIoU": torch.tensor(scores.miou, dtype=torch.float64),
                "pixel_accuracy": torch.tensor(scores.pixel_accuracy, dtype=torch.float64),
                "iou": torch.from_numpy(np.asarray(scores.iou, np.float64)), "confusion": self.confusion.clone()}

    def scores(self) -> SegmentationScores:
        """:meth:`compute`'s scores (synced like it) as a :class:`SegmentationScores`."""
        return scores_from_confusion(self.compute()["confusion"])
