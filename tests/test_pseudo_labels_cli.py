"""``wsss pseudo-labels`` end to end on the toy dataset, with CAM files made from the GT masks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from test_io import save_npy_protocol2

from wsss.cli import main
from wsss.data.voc import VOCLayout
from wsss.errors import DataError
from wsss.formats.cams import read_cams, write_cams
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png
from wsss.records import RECORD_FILE
from wsss.stages.pseudo_labels import make_pseudo_label


def gt_cams(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blurred one-hot maps of the classes present in ``mask``: (K,) int64 classes, (K, H, W) float16."""
    classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64)
    maps = [gaussian_filter((mask == c).astype(np.float32), sigma=3.0) for c in classes]
    cams = np.stack(maps) if maps else np.zeros((0, *mask.shape), np.float32)
    return classes, np.clip(cams, 0, 1).astype(np.float16)


@pytest.fixture(scope="module")
def layout(toy_root) -> VOCLayout:
    return VOCLayout(toy_root)


@pytest.fixture(scope="module")
def cam_dir(layout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cams")
    for image_id in layout.read_ids("train_aug"):
        classes, cams = gt_cams(read_label_png(layout.mask_path(image_id)))
        write_cams(out / f"{image_id}.npz", classes=classes, cams=cams, stage3=np.zeros_like(cams))
    return out


def irn_make_cam_dict(classes: np.ndarray, high_res: np.ndarray) -> dict:
    """What IRN's step/make_cam.py passes to np.save: torch tensors for ``keys`` (0-based) and the
    stride-4 ``cam``, an ndarray for ``high_res``."""
    label = torch.zeros(20)
    label[torch.as_tensor(classes - 1)] = 1
    height, width = high_res.shape[1:]
    return {"keys": torch.nonzero(label)[:, 0], "cam": torch.rand(len(classes), (height + 3) // 4, (width + 3) // 4), "high_res": high_res}


def run(args: list[str]) -> int:
    return main(["pseudo-labels", *map(str, args)])


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_writes_one_valid_png_per_id_and_resumes(layout, cam_dir, tmp_path, capsys):
    out = tmp_path / "labels"
    ids = layout.read_ids("train")
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1]) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    correct = total = 0
    for image_id in ids:
        labels = read_label_png(out / f"{image_id}.png")
        mask = read_label_png(layout.mask_path(image_id))
        assert labels.shape == read_image(layout.image_path(image_id)).shape[:2]
        present = set(np.unique(mask).tolist()) - {255}
        assert set(np.unique(labels).tolist()) <= present | {0}
        valid = mask != 255
        correct += int((labels[valid] == mask[valid]).sum())
        total += int(valid.sum())
    assert correct / total > 0.85  # GT-derived CAMs must give mostly correct labels
    assert f"{len(ids)} written, 0 skipped" in capsys.readouterr().out

    # Resume: nothing rewritten.
    old = 1_000_000_000
    for path in out.glob("*.png"):
        os.utime(path, ns=(old, old))
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1]) == 0
    assert f"0 written, {len(ids)} skipped (already done)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == old for p in out.glob("*.png"))

    # A truncated output is not "done": it is redone, the others are kept.
    broken = out / f"{ids[0]}.png"
    broken.write_bytes(broken.read_bytes()[:40])
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1]) == 0
    assert f"1 written, {len(ids) - 1} skipped" in capsys.readouterr().out
    assert read_label_png(broken).shape == read_image(layout.image_path(ids[0])).shape[:2]

    # --overwrite rewrites everything.
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1, "--overwrite"]) == 0
    assert all(p.stat().st_mtime_ns != old for p in out.glob("*.png"))
    assert no_temp_files(out)


def test_irn_npy_gives_the_same_pngs_as_npz(layout, cam_dir, tmp_path):
    ids = layout.read_ids("train")[:6]
    listfile = tmp_path / "ids.txt"
    listfile.write_text("\n".join(ids) + "\n")
    npy_dir = tmp_path / "irn"
    npy_dir.mkdir()
    for image_id in ids:
        cams, classes = read_cams(cam_dir / f"{image_id}.npz")
        np.save(npy_dir / f"{image_id}.npy", irn_make_cam_dict(classes, cams.astype(np.float32)))
    out_npz, out_npy = tmp_path / "a", tmp_path / "b"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out_npz, "--split", listfile, "--workers", 1]) == 0
    assert run(["--data-root", layout.root, "--cams", npy_dir, "--out", out_npy, "--split", listfile, "--workers", 2]) == 0
    for image_id in ids:
        np.testing.assert_array_equal(read_label_png(out_npz / f"{image_id}.png"), read_label_png(out_npy / f"{image_id}.png"))


def test_gray_and_palette_pngs_hold_the_same_indices_but_only_gray_reads_as_them_everywhere(layout, cam_dir, tmp_path, capsys):
    """--png-mode gray writes 8-bit grayscale PNGs: PIL, imageio (IRN's and PSA's reader) and cv2
    all return their indices. A palette PNG holds the same indices, which PIL returns, but imageio
    returns its palette colours and cv2's grayscale read their luminance."""
    imageio = pytest.importorskip("imageio.v2")
    ids = layout.read_ids("train")
    palette_dir, gray_dir = tmp_path / "palette", tmp_path / "gray"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", palette_dir, "--split", "train", "--workers", 1]) == 0
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", gray_dir, "--split", "train", "--workers", 1, "--png-mode", "gray"]) == 0
    try:
        import cv2  # with the dev extra (grad-cam needs it); the rest of the test does not
    except ImportError:
        cv2 = None
    for image_id in ids:
        palette_png, gray_png = palette_dir / f"{image_id}.png", gray_dir / f"{image_id}.png"
        with Image.open(palette_png) as palette_image, Image.open(gray_png) as gray_image:
            assert (palette_image.mode, gray_image.mode) == ("P", "L")
            indices = np.asarray(palette_image)
            np.testing.assert_array_equal(np.asarray(gray_image), indices)  # PIL: the same indices
            colours = np.asarray(palette_image.convert("RGB"))  # the palette's colours, by PIL's own lookup
        assert indices.any(), "a label map without any class shows nothing"
        np.testing.assert_array_equal(read_label_png(palette_png), indices)
        np.testing.assert_array_equal(read_label_png(gray_png), indices)
        np.testing.assert_array_equal(imageio.imread(gray_png), indices)
        from_palette = imageio.imread(palette_png)
        assert from_palette.shape == (*indices.shape, 3)  # imageio: colours, not labels
        np.testing.assert_array_equal(from_palette, colours)
        if cv2 is not None:
            np.testing.assert_array_equal(cv2.imread(str(gray_png), cv2.IMREAD_GRAYSCALE), indices)
            luminance = cv2.imread(str(palette_png), cv2.IMREAD_GRAYSCALE)
            assert (luminance[indices > 0] != indices[indices > 0]).any()
    capsys.readouterr()

    # A PNG of the other mode is another run's: asking for gray in the palette folder is refused,
    # --overwrite redoes it all, a second gray run keeps everything.
    common = ["--data-root", layout.root, "--cams", cam_dir, "--out", palette_dir, "--split", "train", "--workers", 1, "--png-mode", "gray"]
    assert run(common) == 2
    assert "png_mode: 'palette' -> 'gray'" in capsys.readouterr().err
    for extra, written in ((["--overwrite"], len(ids)), ([], 0)):
        assert run([*common, *extra]) == 0
        assert f"{written} written, {len(ids) - written} skipped" in capsys.readouterr().out
        assert {Image.open(p).mode for p in palette_dir.glob("*.png")} == {"L"}
    with pytest.raises(SystemExit):
        run(["--data-root", layout.root, "--cams", cam_dir, "--out", gray_dir, "--split", "train", "--png-mode", "grey"])
    assert "--png-mode" in capsys.readouterr().err


def test_key_selects_another_array(layout, cam_dir, tmp_path):
    out = tmp_path / "labels"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1, "--key", "stage3"]) == 0
    assert all((read_label_png(p) == 0).all() for p in out.glob("*.png"))  # all-zero maps -> background


def _copy_cams(layout, cam_dir: Path, dest: Path, ids: list[str]) -> None:
    dest.mkdir()
    for image_id in ids:
        (dest / f"{image_id}.npz").write_bytes((cam_dir / f"{image_id}.npz").read_bytes())


def test_missing_cams_are_all_reported_before_any_work(layout, cam_dir, tmp_path, capsys):
    ids = layout.read_ids("train")
    cams = tmp_path / "cams"
    _copy_cams(layout, cam_dir, cams, ids[2:])
    out = tmp_path / "labels"
    assert run(["--data-root", layout.root, "--cams", cams, "--out", out, "--split", "train", "--workers", 1]) == 2
    err = capsys.readouterr().err
    assert "2 of 12 listed ids have no CAM file" in err and ids[0] in err and ids[1] in err
    assert not out.exists() or not list(out.iterdir())

    assert run(["--data-root", layout.root, "--cams", cams, "--out", out, "--split", "train", "--workers", 1, "--skip-missing"]) == 0
    text = capsys.readouterr().out
    assert "10 written" in text and "2 skipped (no CAM file)" in text and ids[0] in text
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids[2:])


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("nan", "NaN or Inf"),
        ("shape", "spatial shape"),
        ("dtype", "must be floating point"),
        ("keys", "missing arrays"),
        ("count", "2 maps for 1 classes"),
        ("range", "must lie in [0, 1]"),
        ("garbage", "cannot read CAM file"),
    ],
)
def test_bad_cam_file_fails_naming_it_and_leaves_nothing_partial(layout, cam_dir, tmp_path, capsys, problem, expected):
    ids = layout.read_ids("train")[:3]
    listfile = tmp_path / "ids.txt"
    listfile.write_text("\n".join(ids))
    cams = tmp_path / "cams"
    _copy_cams(layout, cam_dir, cams, ids)
    bad = cams / f"{ids[1]}.npz"
    good, classes = read_cams(bad)
    arrays = {"classes": classes[:1], "cams": good[:1].astype(np.float32)}
    if problem == "nan":
        arrays["cams"][0, 0, 0] = np.nan
    elif problem == "shape":
        arrays["cams"] = arrays["cams"][:, :-3, :]
    elif problem == "dtype":
        arrays["cams"] = (arrays["cams"] * 255).astype(np.uint8)
    elif problem == "keys":
        arrays = {"maps": arrays["cams"], "classes": arrays["classes"]}
    elif problem == "count":
        arrays["cams"] = np.concatenate([arrays["cams"]] * 2)
    elif problem == "range":
        arrays["cams"] = arrays["cams"] * 3 + 0.5
    bad.unlink()
    if problem == "garbage":
        bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    else:
        np.savez(bad, **arrays)
    out = tmp_path / "labels"
    assert run(["--data-root", layout.root, "--cams", cams, "--out", out, "--split", listfile, "--workers", 1]) == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err and expected in captured.err
    assert "2 written" in captured.out and "1 failed" in captured.out
    assert not (out / f"{ids[1]}.png").exists()
    assert no_temp_files(out)


@pytest.mark.parametrize("protocol", ["np.save", "protocol 2"])
def test_irn_make_cam_file_with_torch_tensors_is_read(tmp_path, protocol):
    rng = np.random.default_rng(0)
    high_res = rng.random((2, 30, 41), dtype=np.float32)
    cams = irn_make_cam_dict(np.array([5, 15]), high_res)
    path = tmp_path / "2007_000032.npy"
    if protocol == "np.save":
        np.save(path, cams)
    else:  # NumPy < 1.17, IRN's time: even the tensors' storage bytes go through _codecs.encode
        raw = save_npy_protocol2(path, cams)
        assert b"_codecs" in raw and b"_load_from_bytes" in raw
    maps, classes = read_cams(path)
    assert classes.dtype == np.int64 and classes.tolist() == [5, 15]
    assert maps.dtype == np.float32
    np.testing.assert_array_equal(maps, high_res)
    strided, _ = read_cams(path, key="cam")
    assert isinstance(strided, np.ndarray) and strided.dtype == np.float32
    np.testing.assert_array_equal(strided, cams["cam"].numpy())


def test_irn_file_of_an_image_without_classes_in_protocol_2_is_read(tmp_path):
    path = tmp_path / "x.npy"
    save_npy_protocol2(path, irn_make_cam_dict(np.zeros(0, np.int64), np.zeros((0, 7, 9), np.float32)))  # b"" pickles as bytes()
    maps, classes = read_cams(path)
    assert maps.shape == (0, 7, 9) and classes.shape == (0,)


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("no keys", "missing entries ['keys']"),
        ("no maps", "missing entries ['high_res']"),
        ("keys (K, 1)", "'keys' must be a 1-D integer array"),
        ("float keys", "'keys' must be a 1-D integer array"),
        ("high_res (H, W)", "'high_res' must have shape (K, H, W)"),
        ("high_res of one class", "'high_res' holds 1 maps for 2 classes"),
        ("high_res a size short", "spatial shape"),
        ("only the strided cam", "spatial shape"),
    ],
)
def test_irn_file_with_missing_or_misshapen_entries_fails_naming_it(layout, tmp_path, problem, expected):
    image_path = layout.image_path(layout.read_ids("train")[0])
    height, width = read_image(image_path).shape[:2]
    cams = irn_make_cam_dict(np.array([3, 8]), np.full((2, height, width), 0.5, np.float32))
    if problem == "no keys":
        del cams["keys"]
    elif problem == "no maps":
        del cams["high_res"], cams["cam"]
    elif problem == "keys (K, 1)":
        cams["keys"] = cams["keys"][:, None]
    elif problem == "float keys":
        cams["keys"] = cams["keys"].float()
    elif problem == "high_res (H, W)":
        cams["high_res"] = cams["high_res"][0]
    elif problem == "high_res of one class":
        cams["high_res"] = cams["high_res"][:1]
    elif problem == "high_res a size short":
        cams["high_res"] = cams["high_res"][:, :-1]
    elif problem == "only the strided cam":
        del cams["high_res"]
    path = tmp_path / "irn.npy"
    np.save(path, cams)
    with pytest.raises(DataError) as error:
        make_pseudo_label(image_path, path, None)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_irn_file_with_background_channel_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, {"keys": np.array([4]), "high_res": np.zeros((2, 5, 5), np.float32)})
    with pytest.raises(DataError, match="background channel"):
        read_cams(path)
    np.save(path, {"keys": np.array([20]), "high_res": np.zeros((1, 5, 5), np.float32)})
    with pytest.raises(DataError, match="0-based"):
        read_cams(path)


def test_psa_file_written_by_psas_own_code_is_read(layout, cam_dir, tmp_path):
    """A dict as PSA's infer_cls.py builds it (keys from range(20), maps of the image's classes) is
    read as the same maps and classes as the npz it came from, and gives the same pseudo-labels."""
    ids = layout.read_ids("train")[:4]
    listfile = tmp_path / "ids.txt"
    listfile.write_text("\n".join(ids) + "\n")
    psa_dir = tmp_path / "psa"
    psa_dir.mkdir()
    for image_id in ids:
        cams, classes = read_cams(cam_dir / f"{image_id}.npz")
        label = np.zeros(20)
        label[classes - 1] = 1
        by_class = dict(zip(classes - 1, cams.astype(np.float32)))
        cam_dict = {i: by_class[i] for i in range(20) if label[i] > 1e-5}
        np.save(psa_dir / f"{image_id}.npy", cam_dict)
        maps, read_classes = read_cams(psa_dir / f"{image_id}.npy")
        np.testing.assert_array_equal(read_classes, classes)
        np.testing.assert_array_equal(maps, cams.astype(np.float32))
    out_npz, out_psa = tmp_path / "a", tmp_path / "b"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out_npz, "--split", listfile, "--workers", 1]) == 0
    assert run(["--data-root", layout.root, "--cams", psa_dir, "--out", out_psa, "--split", listfile, "--workers", 1]) == 0
    for image_id in ids:
        np.testing.assert_array_equal(read_label_png(out_npz / f"{image_id}.png"), read_label_png(out_psa / f"{image_id}.png"))


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("float key", "keys must be integer class indices"),
        ("bool key", "keys must be integer class indices"),
        ("string and integer keys", "mixes string keys"),
        ("class index 20", "must be in 0..19"),
        ("class index -1", "must be in 0..19"),
        ("maps of two sizes", "differ in shape"),
        ("map a list", "must be a 2-D floating point NumPy array"),
        ("map a torch tensor", "must be a 2-D floating point NumPy array"),
        ("map (1, H, W)", "must be a 2-D floating point NumPy array"),
        ("integer map", "must be a 2-D floating point NumPy array"),
        ("values above 1", "must lie in [0, 1]"),
        ("NaN", "NaN or Inf"),
        ("map a size short", "spatial shape"),
        ("not a dict", "expected a CAM dict"),
    ],
)
def test_psa_file_with_bad_keys_or_maps_fails_naming_it(layout, tmp_path, problem, expected):
    image_path = layout.image_path(layout.read_ids("train")[0])
    height, width = read_image(image_path).shape[:2]
    good = np.full((height, width), 0.5, np.float32)
    cam_dict = {2: good, 7: good.copy()}
    if problem == "float key":
        cam_dict = {2.0: good}
    elif problem == "bool key":
        cam_dict = {True: good}
    elif problem == "string and integer keys":
        cam_dict["keys"] = np.array([2, 7])
    elif problem == "class index 20":
        cam_dict[20] = good
    elif problem == "class index -1":
        cam_dict[-1] = good
    elif problem == "maps of two sizes":
        cam_dict[7] = good[:-1]
    elif problem == "map a list":
        cam_dict[7] = good.tolist()
    elif problem == "map a torch tensor":
        cam_dict[7] = torch.from_numpy(good)
    elif problem == "map (1, H, W)":
        cam_dict = {2: good[None]}
    elif problem == "integer map":
        cam_dict[7] = (good * 255).astype(np.uint8)
    elif problem == "values above 1":
        cam_dict[7] = good * 3
    elif problem == "NaN":
        cam_dict[7] = good.copy()
        cam_dict[7][3, 4] = np.nan
    elif problem == "map a size short":
        cam_dict = {2: good[:, :-1], 7: good[:, :-1]}
    elif problem == "not a dict":
        cam_dict = [good]
    path = tmp_path / "psa.npy"
    np.save(path, np.array(cam_dict, dtype=object) if problem == "not a dict" else cam_dict, allow_pickle=True)
    with pytest.raises(DataError) as error:
        make_pseudo_label(image_path, path, None)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_psa_file_takes_no_key(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, {4: np.zeros((5, 5), np.float32)})
    assert read_cams(path)[1].tolist() == [5]
    with pytest.raises(DataError, match="no named arrays"):
        read_cams(path, key="stage3")


def test_crash_while_writing_leaves_no_partial_file(layout, cam_dir, tmp_path, monkeypatch):
    from PIL import Image

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")  # half a file on disk, then the crash
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "labels"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1])
    assert sorted(p.name for p in out.iterdir()) == [RECORD_FILE]  # what made the folder, and no half a PNG


def test_bad_options_exit_2(layout, cam_dir, tmp_path, capsys):
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", tmp_path, "--workers", 0]) == 2
    assert "--workers" in capsys.readouterr().err
    assert run(["--data-root", layout.root, "--cams", tmp_path / "nope", "--out", tmp_path / "o"]) == 2
    assert "CAM directory not found" in capsys.readouterr().err


def test_plus_key_fuses_saved_layers_by_elementwise_maximum(tmp_path):
    classes = np.array([3, 12])
    stage4 = np.array([[[0.1, 0.9], [0.5, 0.0]], [[1.0, 0.2], [0.3, 0.3]]], dtype=np.float16)
    stage5 = np.array([[[0.4, 0.2], [0.5, 1.0]], [[0.0, 0.6], [0.7, 0.1]]], dtype=np.float16)
    path = tmp_path / "a.npz"
    write_cams(path, classes=classes, cams=np.ones_like(stage4), stage4=stage4, stage5=stage5)
    fused, got_classes = read_cams(path, key="stage4+stage5")
    expected = np.array([[[0.4, 0.9], [0.5, 1.0]], [[1.0, 0.6], [0.7, 0.3]]], dtype=np.float16)  # by hand
    np.testing.assert_array_equal(fused, expected)
    np.testing.assert_array_equal(got_classes, classes)
    with pytest.raises(DataError, match=r"missing arrays \['stage3'\]"):
        read_cams(path, key="stage3+stage5")
    np.savez(path, classes=classes, stage4=stage4, stage5=stage5[:, :1])
    with pytest.raises(DataError, match="differ in shape"):
        read_cams(path, key="stage4+stage5")


def test_ignore_band_leaves_uncertain_superpixels_unlabelled_and_evaluate_scores_both_ways(layout, cam_dir, tmp_path, capsys):
    out, report = tmp_path / "labels", tmp_path / "scores.json"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1,
                "--threshold", "0.2", "--ignore-below", "0.6"]) == 0
    ids = layout.read_ids("train")
    preds = {i: read_label_png(out / f"{i}.png") for i in ids}
    assert any((p == 255).any() for p in preds.values()) and any(((p > 0) & (p < 255)).any() for p in preds.values())
    assert main(["evaluate", "--pred", str(out), "--gt", str(layout.mask_dir), "--list", str(layout.list_path("train")),
                 "--json", str(report), "--workers", "1"]) == 0
    assert "of the pixels (255 elsewhere" in capsys.readouterr().out
    scores = json.loads(report.read_text())
    # Independent count: per class, TP / FP / FN over all images, once with 255 as background and once
    # over the labelled pixels alone.
    gts = {i: read_label_png(layout.mask_path(i)) for i in ids}
    valid = {i: gts[i] != 255 for i in ids}
    labelled = {i: valid[i] & (preds[i] != 255) for i in ids}

    def miou(pred_of, where):
        ious = []
        for c in range(21):
            tp = sum(int(((pred_of(i) == c) & (gts[i] == c) & where[i]).sum()) for i in ids)
            fp = sum(int(((pred_of(i) == c) & (gts[i] != c) & where[i]).sum()) for i in ids)
            fn = sum(int(((pred_of(i) != c) & (gts[i] == c) & where[i]).sum()) for i in ids)
            if tp + fp + fn:
                ious.append(tp / (tp + fp + fn))
        return sum(ious) / len(ious)

    assert scores["miou"] == pytest.approx(miou(lambda i: np.where(preds[i] == 255, 0, preds[i]), valid), abs=1e-9)
    assert scores["labelled"]["miou"] == pytest.approx(miou(lambda i: preds[i], labelled), abs=1e-9)
    share = sum(int(labelled[i].sum()) for i in ids) / sum(int(valid[i].sum()) for i in ids)
    assert scores["labelled_share"] == pytest.approx(share, abs=1e-12) and 0 < share < 1


def test_ignore_below_must_lie_above_the_threshold(layout, cam_dir, tmp_path, capsys):
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", tmp_path / "o", "--threshold", "0.4", "--ignore-below", "0.3"]) == 2
    assert "--ignore-below must be above the threshold (0.4), got 0.3" in capsys.readouterr().err


def test_crf_option_votes_on_the_crf_marginals(layout, cam_dir, tmp_path):
    """`--crf` writes exactly what the math gives: superpixel vote on crf_scores' marginals."""
    pytest.importorskip("pydensecrf.densecrf")
    from wsss.pseudo import crf_scores, slic_segments, superpixel_labels

    out = tmp_path / "labels"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1, "--crf", "--threshold", "0.25"]) == 0
    plain = tmp_path / "plain"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", plain, "--split", "train", "--workers", 1, "--threshold", "0.25"]) == 0
    differ = 0
    for image_id in layout.read_ids("train")[:4]:
        image = read_image(layout.image_path(image_id))
        cams, classes = read_cams(cam_dir / f"{image_id}.npz")
        scores = crf_scores(image, cams.astype(np.float32), 0.25)
        expected = superpixel_labels(image, scores[1:], classes, segments=slic_segments(image), background=scores[0])
        np.testing.assert_array_equal(read_label_png(out / f"{image_id}.png"), expected)
        differ += int((read_label_png(plain / f"{image_id}.png") != expected).sum())
    assert differ > 0
