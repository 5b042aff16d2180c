"""Label sets beyond VOC's 21: `wsss evaluate --label-set coco|FILE` against an independent count."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wsss.classes import COCO_CLASS_NAMES, LABEL_SETS, label_set
from wsss.cli import main as cli
from wsss.errors import ConfigError


def write_pngs(folder, maps):
    folder.mkdir()
    for n, values in enumerate(maps):
        Image.fromarray(values.astype(np.uint8), mode="L").save(folder / f"img{n}.png")


def independent_miou(preds, gts, num_labels, ignore=255):
    """Per-class IoU by counting pixels class by class (no confusion matrix), prediction 255 as background."""
    ious = []
    for c in range(num_labels):
        inter = union = 0
        for pred, gt in zip(preds, gts):
            keep = gt != ignore
            p = np.where(pred == 255, 0, pred)[keep] == c
            g = gt[keep] == c
            inter += int((p & g).sum())
            union += int((p | g).sum())
        ious.append(inter / union if union else np.nan)
    return np.array(ious)


def test_coco_values_are_scored_over_81_labels_like_an_independent_count(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 17, 45, 80, 255], size=(30, 40)) for _ in range(3)]
    preds = [np.where(rng.random(g.shape) < 0.7, g, rng.choice([0, 17, 62, 80, 255], size=g.shape)) for g in gts]
    preds = [np.where(p == 255, rng.choice([0, 255], size=p.shape), p) for p in preds]  # some left unlabelled
    write_pngs(tmp_path / "gt", gts)
    write_pngs(tmp_path / "pred", preds)
    out = tmp_path / "scores.json"
    assert cli(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--label-set", "coco",
                "--json", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "hair drier" in printed and "dining table" in printed
    scores = json.loads(out.read_text())
    expected = independent_miou(preds, gts, 81)
    assert scores["label_set"] == "coco"
    assert scores["miou"] == pytest.approx(np.nanmean(expected))
    by_name = scores["iou"]
    assert len(by_name) == 81 and by_name["giraffe"] is None and np.isnan(expected[24])  # absent from both
    assert by_name["person"] == pytest.approx(expected[1]) and by_name["dog"] == pytest.approx(expected[17])
    assert by_name["toothbrush"] == pytest.approx(expected[80])
    # the VOC label set refuses COCO values instead of folding them
    assert cli(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--workers", "1"]) == 2
    assert "label values outside 0..20 and 255: [45, 62, 80]" in capsys.readouterr().err


def test_a_label_set_of_ones_own_from_a_file(tmp_path, capsys):
    spec = tmp_path / "roads.yaml"
    spec.write_text("names: [background, road, car]\nignore: 200\n")
    labels = label_set(spec)
    assert labels.name == "roads" and labels.num_labels == 3 and labels.ignore == 200
    gts = [np.array([[0, 1, 2, 200], [1, 1, 2, 2]])]
    preds = [np.array([[0, 1, 1, 0], [1, 1, 2, 255]])]
    write_pngs(tmp_path / "gt", gts)
    write_pngs(tmp_path / "pred", preds)
    assert cli(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--label-set", str(spec), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    # by hand: background 1/2 (one hit, the unlabelled car pixel joins it), road 3/4, car 1/3
    assert "road" in printed and f"{100 * (1 / 2 + 3 / 4 + 1 / 3) / 3:.2f}" in printed
    for bad, message in (("names: [background]\n", "two or more distinct"), ("names: [a, b]\nignore: 1\n", "ignore must be in 2..255"),
                         ("labels: [a, b]\n", "unknown keys \\['labels'\\]")):
        spec.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            label_set(spec)
    with pytest.raises(ConfigError, match="neither built in"):
        label_set("cityscapes")


def test_built_in_label_sets():
    assert LABEL_SETS["voc"].num_labels == 21 and LABEL_SETS["coco"].num_labels == 81 == len(COCO_CLASS_NAMES) + 1
    assert LABEL_SETS["coco"].names[1] == "person" and LABEL_SETS["coco"].names[80] == "toothbrush"


def test_eval_cams_scores_coco_seeds_from_irn_files_like_an_independent_count(tmp_path):
    """COCO CAMs as IRN writes them (0-based keys up to 79) against 0..80 masks: one threshold's
    seeds by hand (argmax over [threshold, maps], class value = key + 1), scored independently."""
    import torch

    from wsss.stages.eval_cams import evaluate_cams

    rng = np.random.default_rng(5)
    cams_dir, gts = tmp_path / "cams", []
    cams_dir.mkdir()
    seeds = []
    for n in range(3):
        keys = np.array(sorted(rng.choice(80, size=2, replace=False)))
        maps = rng.random((2, 24, 32)).astype(np.float32)
        # IRN's make_cam.py: a dict with keys, cam (stride 4, a torch tensor) and high_res
        np.save(cams_dir / f"img{n}.npy", {"keys": keys, "cam": torch.from_numpy(maps[:, ::4, ::4].copy()), "high_res": maps})
        scores = np.concatenate([np.full((1, 24, 32), 0.5, np.float32), maps])
        seed = np.where(scores.argmax(0) == 0, 0, keys[np.maximum(scores.argmax(0) - 1, 0)] + 1)
        seeds.append(seed)
        gts.append(np.where(rng.random((24, 32)) < 0.8, seed, rng.choice([0, 255, int(keys[0]) + 1], size=(24, 32))))
    write_pngs(tmp_path / "gt", gts)
    results = evaluate_cams(cams_dir, tmp_path / "gt", [f"img{n}" for n in range(3)], [0.5], labels="coco")
    expected = independent_miou(seeds, gts, 81)
    assert results[0.5].miou == pytest.approx(np.nanmean(expected))
    np.testing.assert_allclose(results[0.5].iou, expected, equal_nan=True)
    from wsss.errors import DataError

    with pytest.raises(DataError, match="label values outside 0..20"):  # VOC's labels refuse COCO masks
        evaluate_cams(cams_dir, tmp_path / "gt", ["img0"], [0.5])
    write_pngs(tmp_path / "gt_voc", [np.zeros((24, 32))])  # a VOC mask beside COCO CAMs: the CAM file is refused
    with pytest.raises(DataError, match=r"'keys' values must be in 0..19"):
        evaluate_cams(cams_dir, tmp_path / "gt_voc", ["img0"], [0.5])


def test_a_prediction_holding_the_label_sets_own_ignore_value_counts_as_unlabelled(tmp_path):
    from wsss.classes import LabelSet
    from wsss.formats.label_png import write_label_png
    from wsss.stages.evaluate import pair_confusion

    labels = LabelSet("roads", ("background", "road", "car"), ignore=200)
    gt = np.array([[0, 1, 2, 200]], np.uint8)
    pred = np.array([[200, 1, 255, 2]], np.uint8)  # the first pixel left unlabelled with the set's ignore value
    write_label_png(tmp_path / "gt.png", gt, "gray")
    write_label_png(tmp_path / "pred.png", pred, "gray")
    confusion = pair_confusion(tmp_path / "pred.png", tmp_path / "gt.png", labels)
    # Rows: GT 0..2 (200 left out); columns: predicted 0..2 and "unlabelled".
    assert confusion.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]]
