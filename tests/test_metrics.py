"""Tests for wsss.metrics: one confusion matrix, summed before dividing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from wsss.classes import IGNORE_INDEX, LABEL_NAMES, NUM_LABELS
from wsss.metrics import (
    SegmentationMetric,
    SegmentationScores,
    confusion_matrix,
    count_confusion,
    scores_from_confusion,
)


def reference_iou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Independent per-class IoU: explicit masks per class, no bincount."""
    valid = target != ignore
    ious = np.full(num_classes, np.nan)
    for c in range(num_classes):
        p = (pred == c) & valid
        t = (target == c) & valid
        union = np.logical_or(p, t).sum()
        if union:
            ious[c] = np.logical_and(p, t).sum() / union
    return ious


def random_maps(
    rng: np.random.Generator, shape: tuple[int, ...], present: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Random pred/GT using only classes in ``present``, with some ignore pixels in GT."""
    pred = rng.choice(present, size=shape).astype(np.uint8)
    target = np.where(rng.random(shape) < 0.6, pred, rng.choice(present, size=shape)).astype(np.uint8)
    target[rng.random(shape) < 0.1] = IGNORE_INDEX
    return pred, target


def test_hand_computed_case():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 2]])  # pred at the 255 pixel must not count
    conf = confusion_matrix(pred, target, num_classes=3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    scores = scores_from_confusion(conf)
    # class 0: tp 1, union 2; class 1: tp 2, union 4; class 2: tp 0, union 1
    np.testing.assert_allclose(scores.iou, [1 / 2, 2 / 4, 0.0])
    assert scores.miou == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert scores.pixel_accuracy == pytest.approx(3 / 5)
    assert scores.num_pixels == 5


def test_matches_independent_numpy_reference():
    rng = np.random.default_rng(0)
    present = [0, 1, 3, 7, 15, 20]
    pred, target = random_maps(rng, (4, 37, 41), present)
    metric = SegmentationMetric()
    metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    scores = metric.scores()
    expected = reference_iou(pred, target, NUM_LABELS, IGNORE_INDEX)
    np.testing.assert_allclose(scores.iou, expected, equal_nan=True)
    absent = [c for c in range(NUM_LABELS) if c not in present]
    assert np.isnan(scores.iou[absent]).all()
    assert scores.miou == pytest.approx(np.mean(expected[present]))
    valid = target != IGNORE_INDEX
    assert scores.pixel_accuracy == pytest.approx((pred[valid] == target[valid]).mean())


def test_matches_torchmetrics_on_present_classes():
    rng = np.random.default_rng(1)
    present = [0, 2, 5, 12]
    pred, target = random_maps(rng, (3, 29, 31), present)
    ours = SegmentationMetric()
    theirs = MulticlassJaccardIndex(num_classes=NUM_LABELS, ignore_index=IGNORE_INDEX, average=None)
    p, t = torch.from_numpy(pred).long(), torch.from_numpy(target).long()
    ours.update(p, t)
    theirs.update(p, t)
    scores, reference = ours.scores(), theirs.compute().numpy()
    np.testing.assert_allclose(scores.iou[present], reference[present], rtol=1e-6)
    # torchmetrics scores classes absent from pred and GT as 0; ours leaves them out (NaN) ...
    absent = [c for c in range(NUM_LABELS) if c not in present]
    np.testing.assert_array_equal(reference[absent], 0.0)
    assert np.isnan(scores.iou[absent]).all()
    # ... so our mIoU is the mean over present classes, not over 21.
    assert scores.miou == pytest.approx(reference[present].mean(), rel=1e-6)
    assert scores.miou > reference.mean()


def test_class_only_in_prediction_scores_zero_not_nan():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    scores = scores_from_confusion(confusion_matrix(pred, target, num_classes=4))
    assert scores.iou[2] == 0.0  # false positives only: union > 0
    assert np.isnan(scores.iou[3])
    assert scores.miou == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_updates_sum_counts_not_per_image_ious():
    # Image A: large, background only, perfectly predicted.
    # Image B: small, class 1 half right. Per-image averaging differs from summed counts.
    target_a = np.zeros((10, 10), np.uint8)
    pred_a = target_a.copy()
    target_b = np.array([[1, 1], [0, 0]], np.uint8)
    pred_b = np.array([[1, 0], [0, 0]], np.uint8)

    metric = SegmentationMetric(num_classes=2)
    metric.update(pred_a, target_a)
    metric.update(pred_b, target_b)
    summed = metric.scores()

    once = SegmentationMetric(num_classes=2)
    once.update(np.concatenate([pred_a.ravel(), pred_b.ravel()]),
                np.concatenate([target_a.ravel(), target_b.ravel()]))
    np.testing.assert_array_equal(summed.confusion, once.scores().confusion)
    np.testing.assert_allclose(summed.iou, once.scores().iou)

    # Summed counts: bg tp 102, union 103; class 1 tp 1, union 2.
    assert summed.miou == pytest.approx((102 / 103 + 1 / 2) / 2)
    per_image = [scores_from_confusion(confusion_matrix(p, t, num_classes=2)).miou
                 for p, t in ((pred_a, target_a), (pred_b, target_b))]
    # Image A has only background (IoU 1); image B: bg 2/3, class 1 1/2.
    assert np.mean(per_image) == pytest.approx((1.0 + (2 / 3 + 1 / 2) / 2) / 2)
    assert np.mean(per_image) - summed.miou > 0.04


def test_merge_state_sums_like_ddp_reduction():
    rng = np.random.default_rng(2)
    pred, target = random_maps(rng, (2, 16, 16), [0, 1, 4])
    first, second, both = SegmentationMetric(), SegmentationMetric(), SegmentationMetric()
    first.update(pred[0], target[0])
    second.update(pred[1], target[1])
    both.update(pred, target)
    first.merge_state(second)  # uses the state's dist_reduce_fx, as DDP sync does
    np.testing.assert_array_equal(first.scores().confusion, both.scores().confusion)


def test_reset_and_input_types_agree():
    rng = np.random.default_rng(3)
    pred, target = random_maps(rng, (20, 30), [0, 3, 9])
    expected = confusion_matrix(pred, target)
    assert expected.dtype == np.int64 and expected.shape == (NUM_LABELS, NUM_LABELS)
    for p, t in [
        (pred.astype(np.int64), target.astype(np.int32)),
        (pred.astype(np.uint16), target.astype(np.uint16)),
        (torch.from_numpy(pred), torch.from_numpy(target).long()),
        (pred.T.copy().T, target[:, ::-1][:, ::-1]),  # non-contiguous views
    ]:
        np.testing.assert_array_equal(confusion_matrix(p, t), expected)
    metric = SegmentationMetric()
    metric.update(pred, target)
    assert isinstance(metric.scores(), SegmentationScores)
    metric.reset()
    metric.update(pred[:1], target[:1])
    assert metric.scores().num_pixels == int((target[:1] != IGNORE_INDEX).sum())
    assert count_confusion(torch.from_numpy(pred), torch.from_numpy(target)).dtype == torch.int64


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), "same shape"),
        (np.full((2, 2), 21, np.uint8), np.zeros((2, 2), np.uint8), "pred values"),
        (np.full((2, 2), 255, np.uint8), np.full((2, 2), 255, np.uint8), "pred values"),
        (np.full((2, 2), -1, np.int64), np.zeros((2, 2), np.int64), "pred values"),
        (np.zeros((2, 2), np.uint8), np.full((2, 2), 30, np.uint8), "target values"),
        (np.zeros((2, 2), np.int64), np.full((2, 2), -1, np.int64), "target values"),
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8), "integer"),
        (np.zeros((2, 2), np.uint8), torch.zeros(2, 2), "integer"),
    ],
)
def test_bad_inputs_raise(pred, target, message):
    metric = SegmentationMetric()
    with pytest.raises(ValueError, match=message):
        metric.update(pred, target)


def test_scores_from_confusion_edge_cases_and_bad_input():
    empty = scores_from_confusion(np.zeros((3, 3), np.int64))
    assert np.isnan(empty.iou).all() and np.isnan(empty.miou) and np.isnan(empty.pixel_accuracy)
    # Summing NumPy confusions (as CLI tools do) then scoring equals one count over all pixels.
    a = confusion_matrix(np.array([0, 1]), np.array([0, 0]), num_classes=2)
    b = confusion_matrix(np.array([1, 1]), np.array([1, 255]), num_classes=2)
    everything = confusion_matrix(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 255]), num_classes=2)
    np.testing.assert_array_equal(a + b, everything)
    assert scores_from_confusion(torch.from_numpy(a + b)).miou == pytest.approx((1 / 2 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="square"):
        scores_from_confusion(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="integer"):
        scores_from_confusion(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="negative"):
        scores_from_confusion(np.array([[1, -1], [0, 1]]))


def test_to_dict_is_json_and_table_lists_classes():
    target = np.array([0, 0, 15, 15, 255])
    pred = np.array([0, 15, 15, 15, 3])
    scores = scores_from_confusion(confusion_matrix(pred, target))
    data = json.loads(json.dumps(scores.to_dict(), allow_nan=False))
    assert list(data["iou"]) == list(LABEL_NAMES)
    assert data["iou"]["person"] == pytest.approx(2 / 3)
    assert data["iou"]["background"] == pytest.approx(1 / 2)
    assert data["iou"]["cat"] is None  # absent everywhere
    assert data["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert data["num_pixels"] == 4
    np.testing.assert_array_equal(data["confusion"], scores.confusion)
    table = scores.table()
    assert "person" in table and "66.67" in table and "n/a" in table and "58.33" in table
    with pytest.raises(ValueError, match="names"):
        scores.to_dict(["a", "b"])


def test_compute_returns_tensors_that_log_like_any_torchmetrics_metric():
    """compute() is a dict of tensors (scalars for mIoU and accuracy), equal to the dataclass's
    scores and to an independent count; the scalars go through LightningModule.log_dict."""
    rng = np.random.default_rng(4)
    pred, target = random_maps(rng, (2, 23, 19), [0, 2, 6])
    metric = SegmentationMetric()
    metric.update(pred, target)
    computed, scores = metric.compute(), metric.scores()
    assert all(isinstance(v, torch.Tensor) for v in computed.values())
    assert computed["mIoU"].ndim == computed["pixel_accuracy"].ndim == 0 and computed["iou"].shape == (NUM_LABELS,)
    expected = reference_iou(pred, target, NUM_LABELS, IGNORE_INDEX)
    np.testing.assert_allclose(computed["iou"].numpy(), expected, equal_nan=True)
    assert float(computed["mIoU"]) == pytest.approx(np.nanmean(expected)) == pytest.approx(scores.miou)
    valid = target != IGNORE_INDEX
    assert float(computed["pixel_accuracy"]) == pytest.approx((pred[valid] == target[valid]).mean())
    np.testing.assert_array_equal(computed["confusion"].numpy(), scores.confusion)

    import pytorch_lightning as pl

    logged = {}

    class Module(pl.LightningModule):
        def log(self, name, value, *args, **kwargs):
            logged[name] = value

    Module().log_dict({k: v for k, v in computed.items() if v.ndim == 0})
    assert set(logged) == {"mIoU", "pixel_accuracy"}
