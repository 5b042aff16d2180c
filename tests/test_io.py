"""wsss.io: all-or-nothing writes with the permissions an ordinary new file gets; IRN's pickled
``.npy`` files as the real writers write them."""
from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data.voc import ImageLabels, VOCLayout
from wsss.errors import DataError
from wsss.formats.irn import load_pickled_npy, write_irn_cams
from wsss.formats.label_png import read_label_png
from wsss.io import atomic_path, is_temp_file


def _env() -> dict[str, str]:
    """The environment of a child Python that imports this checkout's wsss."""
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def save_npy_protocol2(path: Path, value) -> bytes:
    """``np.save(path, value)`` as NumPy < 1.17 wrote it (IRN's files): the 0-d object array pickled
    with protocol 2, which stores every byte string as ``_codecs.encode(<latin-1 text>, 'latin1')``.
    (NumPy 2 no longer lets ``write_array``'s ``pickle_kwargs`` choose the protocol.) Returns the bytes."""
    array = np.array(value, dtype=object)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
        pickle.dump(array, handle, protocol=2)
    return Path(path).read_bytes()


def test_atomic_file_gets_the_umask_permissions_not_mkstemps_0600(tmp_path):
    """In a fresh process whose umask is 027: the output is 0640 like any file open() creates
    there, not mkstemp's 0600."""
    script = ("import os, sys; os.umask(0o027); from wsss.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp: tmp.write_text('x')\n"
              "open(sys.argv[2], 'w').close()")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.txt"), str(tmp_path / "plain.txt")], check=True, env=_env())
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640


def test_atomic_writes_never_set_the_process_umask(tmp_path, monkeypatch):
    """The umask is process-wide: setting it, even to put it back at once, races with any other
    thread creating a file. It is read once per process; writes never call os.umask."""
    with atomic_path(tmp_path / "first.txt") as tmp:  # a first write may read it
        tmp.write_text("x")

    def umask(mask):
        raise AssertionError(f"os.umask({mask:o}) called during an atomic write")

    monkeypatch.setattr(os, "umask", umask)
    for n in range(3):
        with atomic_path(tmp_path / f"{n}.txt") as tmp:
            tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "2.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "first.txt").stat().st_mode)


def test_failed_block_leaves_neither_the_file_nor_the_temporary(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "keep.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_irn_cls_labels_in_protocol_2_loads_with_int32_keys_and_missing_ids_are_named(toy_root, tmp_path):
    """IRN's voc12/cls_labels.npy: {np.int32 2007000032: float32[20]}, pickled with protocol 2."""
    rows = np.eye(20, dtype=np.float32)
    ids = [f"2007_{n:06d}" for n in range(32, 52)]
    table = {np.int32(image_id.replace("_", "")): rows[n % 20] + rows[(n + 7) % 20] for n, image_id in enumerate(ids)}
    path = tmp_path / "cls_labels.npy"
    raw = save_npy_protocol2(path, table)
    assert b"_codecs" in raw and b"encode" in raw  # the arrays' bytes really went through _codecs.encode
    assert {type(key) for key in load_pickled_npy(path)} == {np.int32}

    labels = ImageLabels(VOCLayout(toy_root), str(path))
    labels.check(ids)
    for n, image_id in enumerate(ids):
        row = labels(image_id)
        assert row.dtype == np.float32
        np.testing.assert_array_equal(row, rows[n % 20] + rows[(n + 7) % 20])

    absent = [f"2008_{n:06d}" for n in range(12)]
    with pytest.raises(DataError) as error:
        labels.check(ids + absent)
    message = str(error.value)
    assert message.startswith(f"12 listed ids have no image-level labels in label table {path}: 2008_000000, 2008_000001")
    assert "(12 in all)" in message and ids[0] not in message


def test_irn_cams_are_written_atomically_in_irns_layout(tmp_path, monkeypatch):
    path = tmp_path / "2007_000032.npy"
    write_irn_cams(path, np.array([4, 14]), np.full((2, 3, 5), 0.25))
    saved = np.load(path, allow_pickle=True).item()
    assert sorted(saved) == ["cam", "high_res", "keys"]
    # make_cam.py's types: keys and cam torch tensors, high_res a NumPy array
    assert isinstance(saved["keys"], torch.Tensor) and saved["keys"].dtype == torch.int64 and saved["keys"].tolist() == [4, 14]
    assert isinstance(saved["cam"], torch.Tensor) and saved["cam"].dtype == torch.float32 and saved["cam"].shape == (2, 1, 2)
    assert isinstance(saved["high_res"], np.ndarray) and saved["high_res"].dtype == np.float32 and saved["high_res"].shape == (2, 3, 5)
    before = path.read_bytes()

    def save_half_then_fail(file, *args, **kwargs):
        Path(file).write_bytes(before[:100])
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_irn_cams(path, np.array([0]), np.zeros((1, 3, 5)))
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p.name)]


def test_sixteen_bit_label_values_are_never_wrapped_into_uint8(tmp_path):
    """A 16-bit label PNG holding 300 must not become label 44 (300 mod 256), checked or not."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.array([[0, 3], [300, 276]], dtype=np.uint16)).save(path)  # 276 mod 256 = 20, a valid class
    assert Image.open(path).mode.startswith("I")
    for check_values in (True, False):
        with pytest.raises(DataError, match=r"\[276, 300\]"):
            read_label_png(path, check_values=check_values)
    Image.fromarray(np.array([[0, 3], [255, 21]], dtype=np.uint16)).save(path)
    assert read_label_png(path, check_values=False).tolist() == [[0, 3], [255, 21]]  # fits in uint8: read as is
    with pytest.raises(DataError, match=r"\[21\]"):
        read_label_png(path)
