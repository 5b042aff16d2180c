"""Hostile inputs through the real CLI of every stage that reads them (the README's table).

Each case breaks one file (or option) of a private copy of a 6-image toy dataset and runs a stage
in-process. What must hold: exit code 2 and a message naming the offending file or folder
(``check-data`` reports every problem and exits 1), or the documented conversion / skip with its
report; never a Python traceback, never a silently different result.

Dataset: train = toy_00000, toy_00001; train_aug = toy_00000..3; val = toy_00004, toy_00005.
The broken file is always toy_00001's, so every stage meets it on the ``train`` split.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import torch
import yaml
from PIL import Image

from wsss.cli import main
from wsss.data.toy import make_toy_voc
from wsss.formats.cams import write_cams
from wsss.formats.label_png import read_label_png, write_label_png
from wsss.records import RECORD_FILE

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toy"
BROKEN = "toy_00001"


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny networks: on a shared 2-core machine, intra-op threads make a training step 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_toy_voc(tmp_path_factory.mktemp("base") / "VOC2012", seed=2, num_train=4, num_val=2, num_train_subset=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random width-0.125 classifier and segmenter, saved the way train-cls / train-seg save them."""
    from wsss.systems.classifier import ClassifierSystem
    from wsss.systems.segmenter import SegmenterSystem

    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, system_class in (("classifier", ClassifierSystem), ("segmenter", SegmenterSystem)):
            torch.manual_seed(0)
            system = system_class(weights="none", width=0.125)
            paths[name] = folder / f"{name}.ckpt"
            torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, paths[name])
    return paths


def one_hot_cams(mask: np.ndarray) -> dict[str, np.ndarray]:
    classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64)
    cams = np.stack([(mask == c) for c in classes]).astype(np.float16) if len(classes) else np.zeros((0, *mask.shape), np.float16)
    return {"classes": classes, "cams": cams}


@pytest.fixture(scope="module")
def gt_cams(base, tmp_path_factory) -> Path:
    """A valid CAM file per image: the one-hot maps of its GT mask's classes."""
    folder = tmp_path_factory.mktemp("gt_cams")
    for mask_path in (base / "SegmentationClassAug").glob("*.png"):
        write_cams(folder / f"{mask_path.stem}.npz", **one_hot_cams(read_label_png(mask_path)))
    return folder


@pytest.fixture
def root(base, tmp_path) -> Path:
    """A private copy of the dataset, to break."""
    return Path(shutil.copytree(base, tmp_path / "VOC2012"))


def wsss(*argv) -> int:
    """The CLI in-process; an option rejected by argparse/jsonargparse gives its exit code, as the console script does."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def assert_no_traceback(captured) -> None:
    for text in (captured.out, captured.err):
        assert "Traceback" not in text and not re.search(r'^\s*File ".*", line \d+', text, re.M), text[-3000:]


def assert_refused(capsys, code: int, *expected: object, report: bool = False) -> str:
    """Exit 2 (``report``: check-data's exit 1, problems on stdout) with every ``expected`` text in
    the message and no traceback; returns the message."""
    captured = capsys.readouterr()
    assert_no_traceback(captured)
    text = captured.out if report else captured.err
    assert code == (1 if report else 2), text[-3000:]
    for part in expected:
        assert str(part) in text, f"{part!r} not in:\n{text[-3000:]}"
    return text


def write_list(path: Path, ids: list[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def train_cls_argv(root: Path, out: Path, *extra: object) -> list:
    return ["train-cls", "-c", CONFIGS / "classifier.yaml", "--data.root", root, "--data.train_split", "train", "--data.val_split", "val",
            "--data.crop_size", "32", "--data.batch_size", "2", "--data.num_workers", "0", "--model.width", "0.125",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out / "runs", "--checkpoint.dirpath", out / "ckpt", *extra]


def train_seg_argv(root: Path, out: Path, *extra: object) -> list:
    return ["train-seg", "-c", CONFIGS / "segmenter.yaml", "--data.root", root, "--data.train_labels", "gt",
            "--data.train_split", "train", "--data.val_split", "val", "--data.crop_size", "33", "--data.batch_size", "2",
            "--data.num_workers", "0", "--model.width", "0.125", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out / "runs", "--checkpoint.dirpath", out / "ckpt", *extra]


def cams_argv(checkpoints, root: Path, out: Path, *extra: object, split: object = "train") -> list:
    return ["cams", "--checkpoint", checkpoints["classifier"], "--data-root", root, "--split", split, "--out", out,
            "--num-workers", "0", "--accelerator", "cpu", *extra]


def pseudo_argv(root: Path, cams: Path, out: Path, split: object = "train") -> list:
    return ["pseudo-labels", "--data-root", root, "--cams", cams, "--split", split, "--out", out, "--workers", "1", "--n-segments", "20"]


def predict_argv(checkpoints, root: Path, out: Path, split: object = "train") -> list:
    return ["predict-seg", "--checkpoint", checkpoints["segmenter"], "--data-root", root, "--split", split, "--out", out,
            "--num-workers", "0", "--accelerator", "cpu", "--devices", "1"]


def image_readers(checkpoints, gt_cams: Path, root: Path, out: Path, split: object = "train") -> dict[str, list]:
    """argv of every stage that decodes the dataset's images, on ``split``."""
    return {
        "check-data": ["check-data", root, "--split", split, "--workers", "1"],
        "train-cls": train_cls_argv(root, out, "--data.train_split", split),
        "cams": cams_argv(checkpoints, root, out / "cams", split=split),
        "pseudo-labels": pseudo_argv(root, gt_cams, out / "pseudo", split),
        "train-seg": train_seg_argv(root, out, "--data.train_split", split),
        "predict-seg": predict_argv(checkpoints, root, out / "pred", split),
    }


IMAGE_STAGES = ("check-data", "train-cls", "cams", "pseudo-labels", "train-seg", "predict-seg")


# ----------------------------------------------------------------------------- images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header says ``width`` x ``height`` and whose pixel data stops after 20 bytes:
    decoding it would fail as truncated, so a size refusal proves nothing was decoded first."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)[:20]))


def truncated_png(path: Path) -> None:
    Image.open(path).save(path, format="PNG")
    path.write_bytes(path.read_bytes()[:300])


def sixteen_bit_gray(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(pixels).save(path, format="PNG")  # mode I;16


BROKEN_IMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "zero bytes": (lambda p: p.write_bytes(b""), "file is empty (0 bytes)"),
    "not an image": (lambda p: p.write_text("just some text\n"), "unreadable or truncated image"),
    "truncated JPEG": (lambda p: p.write_bytes(p.read_bytes()[:400]), "unreadable or truncated image"),
    "truncated PNG": (truncated_png, "unreadable or truncated image"),
    "8000x8000": (lambda p: png_header_claiming(p, 8000, 8000), "image is 8000x8000, more than the 40,000,000 pixels"),
    "16-bit grayscale": (sixteen_bit_gray, "more than 8 bits per sample"),
}


@pytest.mark.parametrize("problem", BROKEN_IMAGES)
@pytest.mark.parametrize("stage", IMAGE_STAGES)
def test_broken_image_is_named_by_every_stage_that_reads_images(stage, problem, root, checkpoints, gt_cams, tmp_path, capsys):
    image = root / "JPEGImages" / f"{BROKEN}.jpg"
    breaker, message = BROKEN_IMAGES[problem]
    breaker(image)
    code = wsss(*image_readers(checkpoints, gt_cams, root, tmp_path / "out")[stage])
    assert_refused(capsys, code, image, message, report=stage == "check-data")
    assert not list((tmp_path / "out").rglob("*.ckpt"))


@pytest.mark.parametrize("stage", ["cams", "train-cls"])
def test_error_from_a_dataloader_worker_is_the_message_alone(stage, root, checkpoints, tmp_path, capsys):
    # torch re-raises a worker's DataError with the worker's traceback as its message.
    image = root / "JPEGImages" / f"{BROKEN}.jpg"
    image.write_bytes(b"")
    argv = (cams_argv(checkpoints, root, tmp_path / "cams", "--num-workers", "1") if stage == "cams"
            else train_cls_argv(root, tmp_path, "--data.num_workers", "1"))
    text = assert_refused(capsys, wsss(*argv), image, "0 bytes")
    assert "DataLoader worker" not in text and f"wsss {stage}: error: {image}: file is empty (0 bytes)" in text


# Every colour layout PIL reads is converted to RGB once, in wsss.formats.images.read_image; a stage must then
# give exactly what it gives for the RGB file with the same pixels.
ODD_MODES = {"toy_00000": "L", "toy_00001": "CMYK", "toy_00004": "RGBA", "toy_00005": "P"}


def _save_in_mode(path: Path, mode: str) -> None:
    rgb = Image.open(path).convert("RGB")
    if mode == "RGBA":
        odd = rgb.copy()
        odd.putalpha(Image.linear_gradient("L").resize(rgb.size))  # varying alpha, dropped on reading
    elif mode == "P":
        odd = rgb.quantize(64)
    else:
        odd = rgb.convert(mode)
    odd.save(path, format="JPEG" if mode in ("L", "CMYK") else "PNG")


@pytest.fixture
def odd_and_rgb_roots(base, tmp_path) -> tuple[Path, Path, Path]:
    """(dataset with grayscale/CMYK/RGBA/palette images, the same with their RGB conversions
    stored losslessly, list file of those four ids)."""
    odd = Path(shutil.copytree(base, tmp_path / "odd" / "VOC2012"))
    rgb = Path(shutil.copytree(base, tmp_path / "rgb" / "VOC2012"))
    for image_id, mode in ODD_MODES.items():
        _save_in_mode(odd / "JPEGImages" / f"{image_id}.jpg", mode)
        assert Image.open(odd / "JPEGImages" / f"{image_id}.jpg").mode == mode
        Image.open(odd / "JPEGImages" / f"{image_id}.jpg").convert("RGB").save(rgb / "JPEGImages" / f"{image_id}.jpg", format="PNG")
    return odd, rgb, write_list(tmp_path / "odd_ids.txt", list(ODD_MODES))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".ckpt":
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return {k: v.numpy() for k, v in state.items()}
    return {"labels": read_label_png(path)}


@pytest.mark.parametrize("stage", IMAGE_STAGES)
def test_grayscale_cmyk_rgba_palette_images_give_the_rgb_result(stage, odd_and_rgb_roots, checkpoints, gt_cams, tmp_path, capsys):
    odd, rgb, ids = odd_and_rgb_roots
    outputs = {}
    for name, root in (("odd", odd), ("rgb", rgb)):
        out = tmp_path / f"out_{name}"
        argv = image_readers(checkpoints, gt_cams, root, out, ids)[stage]
        assert wsss(*argv) == 0, capsys.readouterr().err[-3000:]
        assert_no_traceback(capsys.readouterr())
        outputs[name] = {p.relative_to(out): _arrays(p) for p in sorted(out.rglob("*")) if p.suffix in (".npz", ".png", ".ckpt")}
    if stage == "check-data":
        return  # exit 0 above: no problem reported for any of the four
    assert outputs["odd"] and outputs["odd"].keys() == outputs["rgb"].keys()
    for name, arrays in outputs["odd"].items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, outputs["rgb"][name][key], err_msg=f"{name}:{key}")


# 1x1 and thinner-than-16-px images: the classifier's trunk needs 16 px (four 2x2 pools), so the
# CAM stage enlarges smaller views to 16 px and resizes their maps back; every other stage takes
# any size (training crops are padded; DeepLab's 3x3/2 pools never empty a map).
TINY_SIZES = {"toy_00000": (1, 1), "toy_00001": (40, 15), "toy_00004": (300, 1), "toy_00005": (1, 300)}  # (W, H)


@pytest.fixture
def tiny_root(root) -> Path:
    for image_id, size in TINY_SIZES.items():
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        mask = np.zeros(size[::-1], np.uint8)
        mask[: max(1, size[1] // 2)] = 3  # class 3 (bird) in the top half
        for folder in ("SegmentationClassAug", "SegmentationClass"):
            write_label_png(root / folder / f"{image_id}.png", mask)
    for annotation in (root / "Annotations").glob("*.xml"):
        annotation.unlink()
    (root / "Annotations").rmdir()  # image-level labels from the masks: bird
    return root


def test_tiny_images_go_through_cams_eval_cams_pseudo_labels_and_evaluate(tiny_root, checkpoints, tmp_path, capsys):
    ids = write_list(tmp_path / "tiny.txt", list(TINY_SIZES))
    masks = tiny_root / "SegmentationClassAug"
    assert wsss("check-data", tiny_root, "--split", ids, "--workers", "1") == 0
    assert wsss(*cams_argv(checkpoints, tiny_root, tmp_path / "cams", "--scales", "1,0.5", "--flip", split=ids)) == 0
    for image_id, (width, height) in TINY_SIZES.items():
        with np.load(tmp_path / "cams" / f"{image_id}.npz") as saved:
            assert saved["classes"].tolist() == [3] and saved["cams"].shape == (1, height, width)
            assert np.isfinite(saved["cams"]).all() and 0 <= saved["cams"].min() <= saved["cams"].max() <= 1
    assert wsss("eval-cams", "--cams", tmp_path / "cams", "--gt", masks, "--list", ids, "--workers", "1") == 0
    assert wsss(*pseudo_argv(tiny_root, tmp_path / "cams", tmp_path / "pseudo", ids)) == 0
    assert wsss("evaluate", "--pred", tmp_path / "pseudo", "--gt", masks, "--list", ids, "--workers", "1") == 0
    for image_id, (width, height) in TINY_SIZES.items():
        assert read_label_png(tmp_path / "pseudo" / f"{image_id}.png").shape == (height, width)
    assert_no_traceback(capsys.readouterr())


def test_tiny_images_train_and_predict(tiny_root, checkpoints, tmp_path, capsys):
    # train on the 1x1 and 15 px images, validate on the 1-px strips (mAP and mIoU on full size)
    assert wsss(*train_cls_argv(tiny_root, tmp_path / "cls")) == 0
    assert wsss(*train_seg_argv(tiny_root, tmp_path / "seg")) == 0
    ids = write_list(tmp_path / "tiny.txt", list(TINY_SIZES))
    assert wsss(*predict_argv(checkpoints, tiny_root, tmp_path / "pred", ids)) == 0
    for image_id, (width, height) in TINY_SIZES.items():
        assert read_label_png(tmp_path / "pred" / f"{image_id}.png").shape == (height, width)
    assert (tmp_path / "cls" / "ckpt" / "last.ckpt").is_file() and (tmp_path / "seg" / "ckpt" / "last.ckpt").is_file()
    assert_no_traceback(capsys.readouterr())


# ----------------------------------------------------------------------------- masks


def _mask_with_values(path: Path) -> None:
    labels = read_label_png(path)
    labels[0, :4], labels[1, :4] = 21, 100
    write_label_png(path, labels)


BROKEN_MASKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "values 21 and 100": (_mask_with_values, "label values outside 0..20 and 255: [21, 100]"),
    "3 rows short": (lambda p: write_label_png(p, read_label_png(p)[:-3]), "SIZE"),
    "RGB colours": (lambda p: Image.open(p).convert("RGB").save(p), "got mode RGB"),
    "zero bytes": (lambda p: p.write_bytes(b""), "file is empty (0 bytes)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:60]), "unreadable or truncated image"),
}


def mask_readers(checkpoints, gt_cams: Path, root: Path, base: Path, out: Path) -> dict[str, list]:
    """argv of every stage that reads masks (GT, pseudo-labels, predictions) where the broken
    mask is ``root``'s."""
    masks, good = root / "SegmentationClassAug", base / "SegmentationClassAug"
    train = root / "ImageSets" / "Segmentation" / "train.txt"
    return {
        "check-data": ["check-data", root, "--split", "train", "--workers", "1"],
        "train-cls --data.labels masks": train_cls_argv(root, out, "--data.labels", "masks"),
        "cams --labels masks": cams_argv(checkpoints, root, out / "cams", "--labels", "masks"),
        "train-seg (pseudo-label folder)": train_seg_argv(root, out, "--data.train_labels", masks),
        "evaluate (GT)": ["evaluate", "--pred", good, "--gt", masks, "--list", train, "--workers", "1"],
        "evaluate (prediction)": ["evaluate", "--pred", masks, "--gt", good, "--list", train, "--workers", "1"],
        "eval-cams (GT)": ["eval-cams", "--cams", gt_cams, "--gt", masks, "--list", train, "--workers", "1"],
    }


MASK_STAGES = ("check-data", "train-cls --data.labels masks", "cams --labels masks", "train-seg (pseudo-label folder)",
               "evaluate (GT)", "evaluate (prediction)", "eval-cams (GT)")


@pytest.mark.parametrize("problem", BROKEN_MASKS)
@pytest.mark.parametrize("stage", MASK_STAGES)
def test_broken_mask_is_named_by_every_stage_that_reads_masks(stage, problem, root, base, checkpoints, gt_cams, tmp_path, capsys):
    mask = root / "SegmentationClassAug" / f"{BROKEN}.png"
    height, width = read_label_png(mask).shape
    breaker, message = BROKEN_MASKS[problem]
    breaker(mask)
    code = wsss(*mask_readers(checkpoints, gt_cams, root, base, tmp_path / "out")[stage])
    text = assert_refused(capsys, code, mask, *([] if message == "SIZE" else [message]), report=stage == "check-data")
    if message == "SIZE":  # messages give W x H or H x W; either way the short mask's size is named
        assert re.search(rf"\b({width}x{height - 3}|{height - 3}x{width})\b", text), text
    assert not list((tmp_path / "out").rglob("*.ckpt")) and not list((tmp_path / "out").rglob("*.npz"))


# ----------------------------------------------------------------------------- list files


def list_readers(checkpoints, gt_cams: Path, root: Path, listed: Path, out: Path) -> dict[str, list]:
    masks = root / "SegmentationClassAug"
    return {
        **image_readers(checkpoints, gt_cams, root, out, listed),
        "evaluate": ["evaluate", "--pred", masks, "--gt", masks, "--list", listed, "--workers", "1"],
        "eval-cams": ["eval-cams", "--cams", gt_cams, "--gt", masks, "--list", listed, "--workers", "1"],
    }


LIST_STAGES = (*IMAGE_STAGES, "evaluate", "eval-cams")
# files each stage writes per id (checked for exactly the listed ids)
WRITTEN = {"cams": ("cams", ".npz"), "pseudo-labels": ("pseudo", ".png"), "predict-seg": ("pred", ".png")}


@pytest.mark.parametrize("stage", LIST_STAGES)
def test_list_with_duplicates_blank_lines_and_crlf_is_read_once_per_id(stage, root, checkpoints, gt_cams, tmp_path, capsys):
    listed = tmp_path / "messy.txt"
    listed.write_bytes(b"toy_00000\r\n\r\ntoy_00001\r\n   \r\ntoy_00000\r\n")
    with pytest.warns(UserWarning, match=f"{re.escape(str(listed))}: 1 duplicate ids ignored"):
        code = wsss(*list_readers(checkpoints, gt_cams, root, listed, tmp_path / "out")[stage])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert_no_traceback(captured)
    if stage in WRITTEN:
        folder, suffix = WRITTEN[stage]
        assert sorted(p.name for p in (tmp_path / "out" / folder).iterdir()) == [f"toy_00000{suffix}", f"toy_00001{suffix}", RECORD_FILE]
    if stage in ("evaluate", "eval-cams", "check-data"):
        assert re.search(r"\b2 images\b", captured.out)


@pytest.mark.parametrize("entry", ["../JPEGImages/toy_00001", "ABSOLUTE"])
@pytest.mark.parametrize("stage", LIST_STAGES)
def test_list_line_that_is_a_path_is_refused_naming_the_list_and_line(stage, entry, root, checkpoints, gt_cams, tmp_path, capsys):
    entry = str(root / "JPEGImages" / "toy_00001") if entry == "ABSOLUTE" else entry
    listed = write_list(tmp_path / "paths.txt", ["toy_00000", entry])
    code = wsss(*list_readers(checkpoints, gt_cams, root, listed, tmp_path / "out")[stage])
    assert_refused(capsys, code, listed, f"line 2: {entry!r}", report=stage == "check-data")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.*"))


# ----------------------------------------------------------------------------- CAM files


class _RunsCode:
    """Unpickling this would run ``touch`` on the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _break_cam(cams: Path, problem: str, marker: Path) -> Path:
    path = cams / f"{BROKEN}.npz"
    with np.load(path) as data:
        classes, maps = data["classes"], data["cams"].astype(np.float32)
    if problem == "NaN":
        maps[0, 0, 0] = np.nan
    elif problem == "Inf":
        maps[0, 5, 5] = np.inf
    elif problem == "integer maps":
        maps = (maps * 255).astype(np.uint8)
    elif problem == "float classes":
        classes = classes.astype(np.float32)
    elif problem == "no 'cams' array":
        path.unlink()
        np.savez(path, classes=classes, maps=maps)
        return path
    elif problem == "maps 3 rows short":
        maps = maps[:, :-3]
    elif problem == "text file named .npz":
        path.write_text("classes: [3]\ncams: not here\n")
        return path
    elif problem == "zero bytes":
        path.write_bytes(b"")
        return path
    elif problem == "object array inside":
        path.unlink()
        np.savez(path, classes=classes, cams=np.array([maps], dtype=object))
        return path
    elif problem == "IRN .npy that runs code":
        path.unlink()
        path = path.with_suffix(".npy")
        np.save(path, np.array(_RunsCode(marker), dtype=object), allow_pickle=True)
        return path
    path.unlink()
    write_cams(path, classes=classes, cams=maps)
    return path


BROKEN_CAMS = {
    "NaN": "contains NaN or Inf",
    "Inf": "contains NaN or Inf",
    "integer maps": "must be floating point",
    "float classes": "must be a 1-D integer array",
    "no 'cams' array": "missing arrays ['cams']",
    "maps 3 rows short": "spatial shape",
    "text file named .npz": "cannot read CAM file",
    "zero bytes": "cannot read CAM file",
    "object array inside": "cannot read CAM file",
    "IRN .npy that runs code": "refusing to load",
}


@pytest.mark.parametrize("problem", BROKEN_CAMS)
@pytest.mark.parametrize("stage", ["pseudo-labels", "eval-cams"])
def test_broken_cam_file_is_named_by_pseudo_labels_and_eval_cams(stage, problem, root, gt_cams, tmp_path, capsys):
    cams = tmp_path / "cams"
    cams.mkdir()
    for image_id in ("toy_00000", BROKEN):
        shutil.copy(gt_cams / f"{image_id}.npz", cams)
    marker = tmp_path / "code-ran"
    broken = _break_cam(cams, problem, marker)
    train = root / "ImageSets" / "Segmentation" / "train.txt"
    argv = (pseudo_argv(root, cams, tmp_path / "pseudo") if stage == "pseudo-labels"
            else ["eval-cams", "--cams", cams, "--gt", root / "SegmentationClassAug", "--list", train, "--workers", "1"])
    assert_refused(capsys, wsss(*argv), broken, BROKEN_CAMS[problem])
    assert not marker.exists()
    assert not (tmp_path / "pseudo" / f"{BROKEN}.png").exists()


# ----------------------------------------------------------------------------- configuration files


def _yaml_with(path: Path, source: Path, section: str | None, key: str) -> Path:
    config = yaml.safe_load(source.read_text())
    (config[section] if section else config)[key] = 1
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "stage, section, key, expected",
    [
        ("train-cls", "model", "widht", r"valid keys in 'model': .*\bwidth\b"),
        ("train-cls", None, "colour", r"valid keys at the top level: .*\bdata\b.*\bmodel\b.*\btrainer\b"),
        ("train-seg", "data", "crop", r"valid keys in 'data': .*\bcrop_size\b"),
    ],
)
def test_unknown_key_in_a_training_yaml_lists_the_valid_ones(stage, section, key, expected, root, tmp_path, capsys):
    source = CONFIGS / ("classifier.yaml" if stage == "train-cls" else "segmenter.yaml")
    config = _yaml_with(tmp_path / "config.yaml", source, section, key)
    argv = (train_cls_argv if stage == "train-cls" else train_seg_argv)(root, tmp_path / "out", "-c", config)
    text = assert_refused(capsys, wsss(*argv), repr(key))
    assert re.search(expected, text), text[-2000:]
    assert not (tmp_path / "out").exists()


def pipeline_yaml(path: Path, root: Path, out: Path, **changes) -> Path:
    config = {"data_root": str(root), "out": str(out), "cam_split": "train", "eval_split": "train", "val_split": "val",
              "classifier": {"config": str(CONFIGS / "classifier.yaml")}, "segmenter": {"config": str(CONFIGS / "segmenter.yaml")}}
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"segmentr": {}}, r"unknown key\(s\) 'segmentr' \(did you mean 'segmenter'\?\) in the pipeline config; valid keys: .*segmenter"),
        ({"pseudo": {"treshold": 0.4}}, r"unknown key\(s\) 'treshold' \(did you mean 'threshold'\?\) in 'pseudo'; valid keys: .*threshold"),
        # classifier/segmenter sections are the stages' own options: checked by their parsers,
        # before the first stage runs (not after hours of CAMs)
        ({"segmenter": {"modle": {"width": 0.5}}}, r"valid keys at the top level: .*\bmodel\b"),
        ({"classifier": {"model": {"widht": 0.5}}}, r"valid keys in 'model': .*\bwidth\b"),
    ],
)
def test_unknown_key_in_a_run_yaml_lists_the_valid_ones_before_any_stage(changes, expected, root, tmp_path, capsys):
    out = tmp_path / "out"
    config = pipeline_yaml(tmp_path / "pipeline.yaml", root, out, **changes)
    code = wsss("run", "-c", config)
    captured = capsys.readouterr()
    assert_no_traceback(captured)
    assert code == 2 and re.search(expected, captured.err), captured.err[-2000:]
    assert not (out / "manifests").exists()


# ----------------------------------------------------------------------------- output folders


def writers(checkpoints, gt_cams: Path, root: Path, bad: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """stage -> (argv writing into ``bad``, the function that does the stage's work)."""
    masks, train = root / "SegmentationClassAug", root / "ImageSets" / "Segmentation" / "train.txt"
    return {
        "cams --out": (cams_argv(checkpoints, root, bad), "pytorch_lightning.Trainer.predict"),
        "pseudo-labels --out": (pseudo_argv(root, gt_cams, bad), "wsss.stages.pseudo_labels.predict_trainer"),
        "predict-seg --out": (predict_argv(checkpoints, root, bad), "pytorch_lightning.Trainer.predict"),
        "evaluate --json": (["evaluate", "--pred", masks, "--gt", masks, "--list", train, "--json", bad / "scores.json"],
                            "wsss.stages.evaluate.evaluate_labels"),
        "eval-cams --json": (["eval-cams", "--cams", gt_cams, "--gt", masks, "--list", train, "--json", bad / "scores.json"],
                             "wsss.stages.eval_cams.evaluate_cams"),
        "train-cls --checkpoint.dirpath": (train_cls_argv(root, tmp, "--checkpoint.dirpath", bad), "pytorch_lightning.Trainer.fit"),
        "train-cls logger save_dir": (train_cls_argv(root, tmp, "--trainer.logger.init_args.save_dir", bad), "pytorch_lightning.Trainer.fit"),
        "train-seg --checkpoint.dirpath": (train_seg_argv(root, tmp, "--checkpoint.dirpath", bad), "pytorch_lightning.Trainer.fit"),
        "run --out": (["run", "-c", pipeline_yaml(tmp / "pipeline.yaml", root, tmp / "unused"), "--out", bad],
                      "wsss.pipeline.steps.check_training_configs"),
    }


WRITERS = ("cams --out", "pseudo-labels --out", "predict-seg --out", "evaluate --json", "eval-cams --json",
           "train-cls --checkpoint.dirpath", "train-cls logger save_dir", "train-seg --checkpoint.dirpath", "run --out")


def _work_started(*args, **kwargs):
    pytest.fail("the stage started its work before checking its output folder")


@pytest.mark.parametrize("stage", WRITERS)
def test_output_folder_under_a_file_is_refused_before_any_work(stage, root, checkpoints, gt_cams, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "out"
    argv, work = writers(checkpoints, gt_cams, root, bad, tmp_path)[stage]
    monkeypatch.setattr(work, _work_started)
    assert_refused(capsys, wsss(*argv), bad, f"{blocker} is a file, not a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permission bits do not stop root")
@pytest.mark.parametrize("stage", WRITERS)
def test_read_only_output_folder_is_refused_before_any_work(stage, root, checkpoints, gt_cams, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    bad = locked / "out"
    argv, work = writers(checkpoints, gt_cams, root, bad, tmp_path)[stage]
    monkeypatch.setattr(work, _work_started)
    locked.chmod(0o555)
    try:
        assert_refused(capsys, wsss(*argv), bad, "Permission denied")
    finally:
        locked.chmod(0o755)


def test_run_names_the_stage_and_the_broken_image(root, tmp_path, capsys):
    image = root / "JPEGImages" / f"{BROKEN}.jpg"
    image.write_bytes(b"not a jpeg")
    config = pipeline_yaml(tmp_path / "pipeline.yaml", root, tmp_path / "out",
                           classifier={"model": {"width": 0.125}, "data": {"crop_size": 32, "batch_size": 4, "num_workers": 0},
                                       "trainer": {"max_epochs": 1, "enable_progress_bar": False}})
    text = assert_refused(capsys, wsss("run", "-c", config), "stage 'classifier' failed", image, "unreadable or truncated image")
    assert text.count("error:") == 1
