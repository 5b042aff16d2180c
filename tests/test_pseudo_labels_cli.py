"""``wsss pseudo-labels`` end to end on the toy dataset, with CAM files made from the GT masks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from wsss.cli import main
from wsss.data.voc import VOCLayout
from wsss.errors import DataError
from wsss.io import read_image, read_label_png, write_npz
from wsss.stages.pseudo_labels import load_cams


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
        write_npz(out / f"{image_id}.npz", classes=classes, cams=cams, stage3=np.zeros_like(cams))
    return out


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
        cams, classes = load_cams(cam_dir / f"{image_id}.npz")
        # IRN make_cam.py: keys are 0-based foreground indices, high_res float32 maps.
        np.save(npy_dir / f"{image_id}.npy", {"keys": classes - 1, "high_res": cams.astype(np.float32)})
    out_npz, out_npy = tmp_path / "a", tmp_path / "b"
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", out_npz, "--split", listfile, "--workers", 1]) == 0
    assert run(["--data-root", layout.root, "--cams", npy_dir, "--out", out_npy, "--split", listfile, "--workers", 2]) == 0
    for image_id in ids:
        np.testing.assert_array_equal(read_label_png(out_npz / f"{image_id}.png"), read_label_png(out_npy / f"{image_id}.png"))


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
    good, classes = load_cams(bad)
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
        write_npz(bad, **arrays)
    out = tmp_path / "labels"
    assert run(["--data-root", layout.root, "--cams", cams, "--out", out, "--split", listfile, "--workers", 1]) == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err and expected in captured.err
    assert "2 written" in captured.out and "1 failed" in captured.out
    assert not (out / f"{ids[1]}.png").exists()
    assert no_temp_files(out)


def test_irn_file_with_background_channel_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, {"keys": np.array([4]), "high_res": np.zeros((2, 5, 5), np.float32)})
    with pytest.raises(DataError, match="background channel"):
        load_cams(path)
    np.save(path, {"keys": np.array([20]), "high_res": np.zeros((1, 5, 5), np.float32)})
    with pytest.raises(DataError, match="0-based"):
        load_cams(path)


def test_crash_while_writing_leaves_no_partial_file(layout, cam_dir, tmp_path, monkeypatch):
    from PIL import Image

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")  # half a file on disk, then the crash
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "labels"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(["--data-root", layout.root, "--cams", cam_dir, "--out", out, "--split", "train", "--workers", 1])
    assert out.is_dir() and not list(out.iterdir())


def test_bad_options_exit_2(layout, cam_dir, tmp_path, capsys):
    assert run(["--data-root", layout.root, "--cams", cam_dir, "--out", tmp_path, "--workers", 0]) == 2
    assert "--workers" in capsys.readouterr().err
    assert run(["--data-root", layout.root, "--cams", tmp_path / "nope", "--out", tmp_path / "o"]) == 2
    assert "CAM directory not found" in capsys.readouterr().err
