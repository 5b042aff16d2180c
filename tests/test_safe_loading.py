"""Every file a command unpickles is read without running pickled code.

A crafted pickle whose ``__reduce__`` would create a marker file is given to each command in each
place that takes a checkpoint, weights or an IRN ``.npy`` (also as the bytes of a pickled torch
tensor's storage, which torch itself would unpickle with ``weights_only=False``): the command must
exit with status 2, name the file, and the marker must never appear.
"""
from __future__ import annotations

import codecs
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from test_io import save_npy_protocol2
from test_segment_stage import train_args as seg_train_args
from test_train_cls import _train_args as cls_train_args

from wsss.cli import main as wsss_main
from wsss.data.voc import VOCLayout
from wsss.errors import DataError
from wsss.formats.images import read_image
from wsss.formats.irn import load_pickled_npy


class CreatesMarker:
    """Unpickling this object calls ``open(marker, "w")``: the file appears iff pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class StorageCreatesMarker:
    """Pickles as a tensor storage does, ``torch.storage._load_from_bytes(<bytes>)``, with bytes in
    torch's legacy format that hold a :class:`CreatesMarker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        buffer = io.BytesIO()
        torch.save(CreatesMarker(self.marker), buffer, _use_new_zipfile_serialization=False)
        return (torch.storage._load_from_bytes, (buffer.getvalue(),))


def craft_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"model.classifier.weight": CreatesMarker(marker)}, "hyper_parameters": {}}, path)
    return path


def craft_npy(path: Path, marker: Path, payload: type = CreatesMarker, protocol: int | None = None, **entries) -> Path:
    """An ``.npy`` dict of ``entries`` plus a ``payload``, written by ``np.save`` or with pickle ``protocol`` 2."""
    value = {**entries, "payload": payload(marker)}
    if protocol == 2:
        save_npy_protocol2(path, value)
    else:
        np.save(path, value, allow_pickle=True)
    return path


def test_crafted_files_do_run_code_when_unpickled_naively(tmp_path):
    """The control: without the safe loaders, both kinds of file execute their payload."""
    marker = tmp_path / "marker"
    torch.load(craft_checkpoint(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    np.load(craft_npy(tmp_path / "evil.npy", marker), allow_pickle=True)
    assert marker.exists()
    marker.unlink()
    np.load(craft_npy(tmp_path / "evil_storage.npy", marker, StorageCreatesMarker), allow_pickle=True)
    assert marker.exists()


CASES = ["cams --checkpoint", "cams --labels", "cams --labels protocol 2", "train-cls --model.weights", "train-cls --data.labels",
         "train-cls --ckpt_path", "train-seg --model.weights", "train-seg --model.weights classifier:",
         "train-seg --ckpt_path", "train-seg --ckpt_path last", "predict-seg --checkpoint", "pseudo-labels IRN <id>.npy",
         "pseudo-labels IRN <id>.npy tensor storage", "pseudo-labels PSA <id>.npy"]


def command_with_crafted_file(case: str, toy_root: Path, tmp: Path, marker: Path) -> tuple[list[str], Path]:
    """The command line of ``case`` and the crafted file it is given."""
    evil_ckpt = craft_checkpoint(tmp / "evil.ckpt", marker)
    train_ids = VOCLayout(toy_root).read_ids("train")
    protocol = 2 if case.endswith("protocol 2") else None
    evil_labels = craft_npy(tmp / "cls_labels.npy", marker, protocol=protocol, **{i: np.eye(20, dtype=np.float32)[0] for i in train_ids})
    command, option = case.removesuffix(" protocol 2").split(" ", 1)
    if command == "cams":
        from wsss.systems.classifier import ClassifierSystem

        system = ClassifierSystem(weights="none", width=0.125)
        torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, tmp / "classifier.ckpt")
        args = ["cams", "--data-root", str(toy_root), "--split", "train", "--out", str(tmp / "out"), "--num-workers", "0", "--accelerator", "cpu"]
        if option == "--checkpoint":
            return args + ["--checkpoint", str(evil_ckpt)], evil_ckpt
        return args + ["--checkpoint", str(tmp / "classifier.ckpt"), "--labels", str(evil_labels)], evil_labels
    if command == "train-cls":
        if option == "--model.weights":  # the toy preset's VGG16-BN takes no weights file: the plain VGG16 does
            return cls_train_args(toy_root, tmp, "--model.batch_norm", "false", "--model.weights", str(evil_ckpt)), evil_ckpt
        if option == "--data.labels":
            return cls_train_args(toy_root, tmp, "--data.labels", str(evil_labels)), evil_labels
        return cls_train_args(toy_root, tmp, "--ckpt_path", str(evil_ckpt)), evil_ckpt
    if command == "train-seg":
        if option == "--ckpt_path last":  # Lightning finds the checkpoint itself: <checkpoint.dirpath>/last.ckpt
            (tmp / "ckpt").mkdir()
            evil_ckpt.rename(tmp / "ckpt" / "last.ckpt")
            return seg_train_args(toy_root, tmp, "gt", 2, "--ckpt_path", "last"), tmp / "ckpt" / "last.ckpt"
        value = f"classifier:{evil_ckpt}" if option.endswith("classifier:") else str(evil_ckpt)
        return seg_train_args(toy_root, tmp, "gt", 2, option.split()[0], value), evil_ckpt
    if command == "predict-seg":
        return ["predict-seg", "--checkpoint", str(evil_ckpt), "--data-root", str(toy_root), "--out", str(tmp / "out"),
                "--accelerator", "cpu", "--num-workers", "0"], evil_ckpt
    layout = VOCLayout(toy_root)
    cam_dir = tmp / "cams"
    cam_dir.mkdir()
    (tmp / "ids.txt").write_text("\n".join(train_ids[:2]) + "\n")
    pseudo_labels = ["pseudo-labels", "--data-root", str(toy_root), "--cams", str(cam_dir), "--out", str(tmp / "out"),
                     "--split", str(tmp / "ids.txt"), "--workers", "1"]
    if option.startswith("PSA"):  # a PSA CAM folder ({class index: map} dicts) whose second file's map is the payload
        size = read_image(layout.image_path(train_ids[0])).shape[:2]
        np.save(cam_dir / f"{train_ids[0]}.npy", {0: np.zeros(size, np.float32)}, allow_pickle=True)
        np.save(cam_dir / f"{train_ids[1]}.npy", {0: CreatesMarker(marker)}, allow_pickle=True)
        return pseudo_labels, cam_dir / f"{train_ids[1]}.npy"
    # pseudo-labels: an IRN-style CAM folder (<id>.npy dicts, keys a torch tensor as make_cam.py
    # writes them) in which one file carries the payload, as an object or as a tensor's storage
    for image_id in train_ids[:2]:
        size = read_image(layout.image_path(image_id)).shape[:2]
        np.save(cam_dir / f"{image_id}.npy", {"keys": torch.tensor([0]), "high_res": np.zeros((1, *size), np.float32)}, allow_pickle=True)
    payload = StorageCreatesMarker if option.endswith("tensor storage") else CreatesMarker
    evil = craft_npy(cam_dir / f"{train_ids[1]}.npy", marker, payload, keys=torch.tensor([0]), high_res=np.zeros((1, *size), np.float32))
    return pseudo_labels, evil


@pytest.mark.parametrize("case", CASES)
def test_crafted_pickle_is_refused_without_running_it(case, toy_root, tmp_path, capsys, monkeypatch):
    # torch.load calls that leave weights_only to torch's default (as Lightning's own loader
    # does) now unpickle anything: only an explicit weights_only=True keeps the payload out.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    args, evil = command_with_crafted_file(case, toy_root, tmp_path, marker)
    capsys.readouterr()
    assert wsss_main(args) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "refusing to load" in err, err
    assert not marker.exists(), "pickled code ran"


class EncodeCall:
    """Pickles as ``_codecs.encode(*args)``."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (codecs.encode, self.args)


def test_codecs_encode_loads_only_as_latin1_text(tmp_path):
    """Protocol 2 stores bytes as ``_codecs.encode(str, 'latin1')``; no other codec or argument passes."""
    path = tmp_path / "x.npy"
    np.save(path, {"data": EncodeCall("\xff\x00a", "latin1"), "also": EncodeCall("b", "latin-1")}, allow_pickle=True)
    assert load_pickled_npy(path) == {"data": b"\xff\x00a", "also": b"b"}
    for args in [("abc", "utf-16"), ("abc", "rot13"), ("YWJj", "base64"), (b"abc", "latin1")]:
        np.save(path, {"data": EncodeCall(*args)}, allow_pickle=True)
        with pytest.raises(DataError, match="refusing to load _codecs.encode") as error:
            load_pickled_npy(path)
        assert str(path) in str(error.value)
