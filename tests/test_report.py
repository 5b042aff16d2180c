"""``wsss report`` / ``wsss show`` on a fake pipeline output folder written in the real layout."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main as cli_main
from wsss.data.voc import VOCLayout
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png
from wsss.report import DEFAULT_TILE, HEADER_HEIGHT, MARGIN, NUM_COLUMNS, jet, sheet_size


def _cams_npz(path, classes, shape, keys, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(classes)
    arrays = {key: rng.random((k, *shape)).astype(np.float16) for key in keys}
    np.savez(path, classes=np.asarray(classes, dtype=np.int64), **arrays)


@pytest.fixture()
def fake_run(toy_root, tmp_path):
    """OUT with CAMs for the first 5 train ids, pseudo-labels for 5, predictions for 3 only."""
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    for image_id in ids[:5]:
        shape = read_image(layout.image_path(image_id)).shape[:2]
        mask = read_label_png(layout.mask_path(image_id))
        classes = [v for v in np.unique(mask) if 0 < v < 255] or [1]
        _cams_npz(out / "cams/layercam" / f"{image_id}.npz", classes, shape, ("cams", "stage3", "stage4", "stage5"), rng)
        _cams_npz(out / "cams/gradcam" / f"{image_id}.npz", classes, shape, ("cams",), rng)
        for method in ("layercam", "gradcam"):
            (out / "pseudo" / method).mkdir(parents=True, exist_ok=True)
            shutil.copy(layout.mask_path(image_id), out / "pseudo" / method / f"{image_id}.png")
    for image_id in ids[:3]:
        (out / "predictions/train").mkdir(parents=True, exist_ok=True)
        shutil.copy(layout.mask_path(image_id), out / "predictions/train" / f"{image_id}.png")
    results = {"data_root": str(toy_root), "rows": [{"stage": "pseudo/layercam", "mIoU": 0.123456}],
               "config": {"epochs": 3, "nested": {"a": [1, 2]}}}
    (out / "results.json").write_text(json.dumps(results))
    return out, ids


def test_jet_endpoints():
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours.shape == (3, 3) and colours.dtype == np.uint8
    assert colours[0].argmax() == 2 and colours[2].argmax() == 0  # blue at 0, red at 1
    assert colours[1, 1] == 255  # green in the middle


def test_report_cli_writes_sheets_and_index(fake_run, capsys):
    out, ids = fake_run
    (out / "cams/gradcam" / f"{ids[1]}.npz").write_bytes(b"not a zip")  # corrupt: an n/a tile, not a crash
    tile = 48
    assert cli_main(["report", str(out), "--max-images", "8", "--tile", str(tile)]) == 0
    index = out / "report" / "index.html"
    assert capsys.readouterr().out.strip().endswith(str(index))
    # 8 images at 6 per sheet: 6 rows then 2 rows
    width = MARGIN + NUM_COLUMNS * (tile + MARGIN)
    for name, rows in (("sheet_00.png", 6), ("sheet_01.png", 2)):
        with Image.open(out / "report" / name) as sheet:
            sheet.load()
            assert sheet.size == sheet_size(rows, tile) == (width, HEADER_HEIGHT + MARGIN + rows * (tile + MARGIN))
    text = index.read_text()
    assert "sheet_00.png" in text and "sheet_01.png" in text
    assert "pseudo/layercam" in text and "0.1235" in text and "epochs" in text
    # ids[3] has CAMs but no prediction, ids[6] has nothing: both rendered, as grey n/a tiles
    sheet = np.asarray(Image.open(out / "report" / "sheet_00.png").convert("RGB"))
    y = HEADER_HEIGHT + MARGIN + 3 * (tile + MARGIN)
    x_pred = MARGIN + (NUM_COLUMNS - 1) * (tile + MARGIN)
    assert (sheet[y + tile - 2, x_pred:x_pred + tile] == 128).all()  # prediction column of row 3: n/a
    x_grad = MARGIN + 2 * (tile + MARGIN)
    y1 = HEADER_HEIGHT + MARGIN + 1 * (tile + MARGIN)
    assert (sheet[y1 + tile - 2, x_grad:x_grad + tile] == 128).all()  # corrupt Grad-CAM file of row 1: n/a
    x_img = MARGIN
    assert not (sheet[y + tile // 2, x_img:x_img + tile] == 128).all()  # its image is there


def test_report_python_api_default_tile(fake_run):
    from wsss.report import write_report

    out, _ = fake_run
    index = write_report(out, max_images=2)
    with Image.open(index.parent / "sheet_00.png") as sheet:
        assert sheet.size == sheet_size(2, DEFAULT_TILE)
    assert not (index.parent / "sheet_01.png").exists()


def test_show_writes_one_row(fake_run, tmp_path, capsys):
    out, ids = fake_run
    assert cli_main(["show", ids[4], "--out", str(out), "--tile", "40"]) == 0  # no prediction for ids[4]
    path = out / "report" / f"show_{ids[4]}.png"
    assert capsys.readouterr().out.strip() == str(path)
    with Image.open(path) as picture:
        assert picture.size == sheet_size(1, 40)
    save = tmp_path / "one.png"
    assert cli_main(["show", ids[0], "--out", str(out), "--save", str(save)]) == 0
    with Image.open(save) as picture:
        assert picture.size == sheet_size(1, DEFAULT_TILE)


def test_missing_out_dir_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "pipeline output folder not found" in capsys.readouterr().err
    assert cli_main(["show", "x", "--out", str(tmp_path / "nope")]) == 2


def test_without_a_data_root_ids_come_from_cam_files_not_temporary_ones(tmp_path):
    from wsss.report import RunFiles, _report_ids

    cam_dir = tmp_path / "cams" / "layercam"
    cam_dir.mkdir(parents=True)
    for name in ("toy_00002.npz", "toy_00001.npz", ".toy_00003.npz.k2j3h4g5.host-99.tmp.npz"):
        (cam_dir / name).touch()
    assert _report_ids(RunFiles(tmp_path, None, []), "train", 10) == ["toy_00001", "toy_00002"]
