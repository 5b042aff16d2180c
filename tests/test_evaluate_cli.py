"""``wsss evaluate`` and ``wsss eval-cams`` end to end on the toy dataset, checked against hand counts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main as cli_main
from wsss.data.voc import VOCLayout
from wsss.formats.cams import write_cams
from wsss.formats.label_png import read_label_png, write_label_png
from wsss.stages.eval_cams import evaluate_cams, parse_thresholds
from wsss.stages.evaluate import evaluate_labels


def main(argv: list) -> int:
    return cli_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def layout(toy_root) -> VOCLayout:
    return VOCLayout(toy_root)


@pytest.fixture(scope="module")
def val_ids(layout) -> list[str]:
    return layout.read_ids("val")


@pytest.fixture()
def listfile(layout) -> Path:
    return layout.list_path("val")


def copy_masks(layout: VOCLayout, ids: list[str], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        write_label_png(dest / f"{image_id}.png", read_label_png(layout.mask_path(image_id)))
    return dest


def hand_miou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, dict[int, float], float]:
    """mIoU, per-class IoU and pixel accuracy by direct pixel counting (no wsss.metrics)."""
    inter = {c: 0 for c in range(21)}
    union = {c: 0 for c in range(21)}
    correct = counted = 0
    for pred, gt in pairs:
        pred = np.where(pred == 255, 0, pred)
        valid = gt != 255
        for c in range(21):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += int((p & g).sum())
            union[c] += int((p | g).sum())
        correct += int(((pred == gt) & valid).sum())
        counted += int(valid.sum())
    ious = {c: inter[c] / union[c] for c in range(21) if union[c] > 0}
    return sum(ious.values()) / len(ious), ious, correct / counted


def test_gt_against_itself_is_perfect(layout, listfile, capsys):
    assert main(["evaluate", "--pred", layout.mask_dir, "--gt", layout.mask_dir, "--list", listfile, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "100.00" in out and "8 images evaluated" in out


def test_known_perturbation_matches_hand_count(layout, val_ids, listfile, tmp_path, capsys):
    pred_dir = copy_masks(layout, val_ids, tmp_path / "pred")
    target = val_ids[0]
    pred = read_label_png(pred_dir / f"{target}.png")
    pred[10:60, 20:90] = 0  # a rectangle of background over the first image
    pred[0:5, :] = 255  # "undecided" prediction pixels count as background
    write_label_png(pred_dir / f"{target}.png", pred)
    json_path = tmp_path / "out" / "scores.json"
    assert main(["evaluate", "--pred", pred_dir, "--gt", layout.mask_dir, "--list", listfile, "--json", json_path, "--workers", "2"]) == 0

    pairs = [(read_label_png(pred_dir / f"{i}.png"), read_label_png(layout.mask_path(i))) for i in val_ids]
    miou, ious, accuracy = hand_miou(pairs)
    assert miou < 0.99  # the perturbation matters
    data = json.loads(json_path.read_text())
    assert data["miou"] == pytest.approx(miou, abs=1e-12)
    assert data["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    names = list(data["iou"])
    for c, value in enumerate(data["iou"].values()):
        assert value == (pytest.approx(ious[c], abs=1e-12) if c in ious else None), names[c]
    assert data["num_images"] == 8 and data["skipped_missing"] == []
    assert f"{100 * miou:.2f}" in capsys.readouterr().out
    assert [p.name for p in json_path.parent.iterdir()] == ["scores.json"]  # no temp file left

    # The Python entry point other stages call gives the same numbers.
    scores = evaluate_labels(pred_dir, layout.mask_dir, val_ids)
    assert scores.miou == pytest.approx(miou, abs=1e-12)


def test_without_list_evaluates_every_gt_png(layout, tmp_path, capsys):
    gt_dir = copy_masks(layout, layout.read_ids("val")[:3], tmp_path / "gt")
    assert main(["evaluate", "--pred", gt_dir, "--gt", gt_dir, "--workers", "1"]) == 0
    assert "3 images evaluated" in capsys.readouterr().out


def test_missing_prediction(layout, val_ids, listfile, tmp_path, capsys):
    pred_dir = copy_masks(layout, val_ids[1:], tmp_path / "pred")
    assert main(["evaluate", "--pred", pred_dir, "--gt", layout.mask_dir, "--list", listfile, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "1 of 8 ids have no prediction" in err and val_ids[0] in err
    assert main(["evaluate", "--pred", pred_dir, "--gt", layout.mask_dir, "--list", listfile, "--workers", "1", "--skip-missing"]) == 0
    out = capsys.readouterr().out
    assert "7 images evaluated" in out and "1 skipped (no prediction)" in out and val_ids[0] in out


@pytest.mark.parametrize("problem", ["size", "values", "rgb", "truncated"])
def test_bad_prediction_names_the_file(layout, val_ids, listfile, tmp_path, capsys, problem):
    pred_dir = copy_masks(layout, val_ids, tmp_path / "pred")
    bad = pred_dir / f"{val_ids[3]}.png"
    labels = read_label_png(bad)
    if problem == "size":
        write_label_png(bad, labels[:-1])
        expected = "prediction is"
    elif problem == "values":
        labels[0, 0] = 50
        Image.fromarray(labels, mode="L").save(bad)
        expected = "outside 0..20"
    elif problem == "rgb":
        Image.fromarray(np.stack([labels] * 3, -1)).save(bad)
        expected = "mode RGB"
    else:
        bad.write_bytes(bad.read_bytes()[:50])
        expected = "truncated"
    assert main(["evaluate", "--pred", pred_dir, "--gt", layout.mask_dir, "--list", listfile, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err


# --------------------------------------------------------------------------- eval-cams


def write_step_cams(layout: VOCLayout, ids: list[str], dest: Path) -> Path:
    """Class maps 0.5 inside the object and 0.2 outside: any threshold in (0.2, 0.5) is perfect."""
    dest.mkdir()
    for image_id in ids:
        mask = read_label_png(layout.mask_path(image_id))
        classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64)
        cams = np.stack([np.where(mask == c, 0.5, 0.2) for c in classes]).astype(np.float32)
        write_cams(dest / f"{image_id}.npz", classes=classes, cams=cams, stage3=np.zeros_like(cams))
    return dest


def test_eval_cams_finds_the_known_threshold_band(layout, val_ids, tmp_path, capsys):
    cams = write_step_cams(layout, val_ids, tmp_path / "cams")
    json_path = tmp_path / "cams.json"
    assert main(["eval-cams", "--cams", cams, "--gt", layout.mask_dir, "--thresholds", "0.05:0.6:0.05", "--json", json_path, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    data = json.loads(json_path.read_text())
    rows = {round(r["threshold"], 6): r["miou"] for r in data["thresholds"]}
    assert sorted(rows) == [round(0.05 * k, 6) for k in range(1, 13)]
    assert 0.2 < data["best_threshold"] < 0.5 and data["best_miou"] == pytest.approx(1.0)
    for t, miou in rows.items():
        if 0.2 < t < 0.5:
            assert miou == pytest.approx(1.0), t
        elif t < 0.2 or t >= 0.5:  # background taken as object / objects taken as background
            assert miou < 0.9, t
    assert "<- best" in out and "eq. 10 default" in out

    # The per-layer array: all-zero maps give background everywhere.
    results = evaluate_cams(cams, layout.mask_dir, val_ids, [0.3], key="stage3")
    scores = results[0.3]
    assert scores.iou[0] < 1 and np.nansum(scores.iou[1:]) == 0


def test_thresholds_always_include_default():
    assert parse_thresholds("0.1:0.2:0.05") == [0.1, 0.15, 0.2, 0.3]
    assert parse_thresholds("0.5,0.1") == [0.1, 0.3, 0.5]


@pytest.mark.parametrize("problem", ["nan", "shape", "missing"])
def test_eval_cams_bad_inputs(layout, val_ids, listfile, tmp_path, capsys, problem):
    cams = write_step_cams(layout, val_ids, tmp_path / "cams")
    bad = cams / f"{val_ids[2]}.npz"
    with np.load(bad) as data:
        arrays = dict(data)
    if problem == "nan":
        arrays["cams"][0, 1, 1] = np.inf
        write_cams(bad, **arrays)
        expected = [str(bad), "NaN or Inf"]
    elif problem == "shape":
        arrays["cams"] = arrays["cams"][:, 1:, :]
        write_cams(bad, **arrays)
        expected = [str(bad), "spatial shape"]
    else:
        bad.unlink()
        expected = ["1 of 8 ids have no CAM file", val_ids[2]]
    assert main(["eval-cams", "--cams", cams, "--gt", layout.mask_dir, "--list", listfile, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert all(e in err for e in expected), err
