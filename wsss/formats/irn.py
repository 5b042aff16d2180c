"""IRN's ``.npy`` files (jiwoon-ahn/irn), read without running pickled code.

- CAM files of ``step/make_cam.py``: ``np.save`` of a dict ``{"keys": 0-based class indices,
  "cam": stride-4 maps, "high_res": maps at the image size}``; IRN stores ``keys`` and ``cam`` as
  torch tensors, ``high_res`` as a NumPy array. :func:`write_irn_cams` writes exactly that, with
  types (``keys`` int64 tensor, ``cam`` float32 tensor from :func:`strided_cam`, ``high_res``
  float32 array), so ``step/cam_to_ir_label.py`` (``high_res``) and ``step/make_sem_seg_labels.py``
  (``cam``, moved to the GPU) read it as they read IRN's own; :func:`irn_cam_arrays` gives any such
  dict's entries as NumPy arrays, and :func:`wsss.formats.cams.read_cams` validates the maps.
- ``cls_labels.npy``: a dict image id -> float[20] (IRN's ids are integers: 2007_000032 -> 2007000032),
  pickled with protocol 2 by NumPy < 1.17 (:func:`read_label_table`).

Plain ``np.load(allow_pickle=True)`` would run any code a crafted file names; every read here goes
through :func:`load_pickled_npy`, a restricted unpickler.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from wsss.errors import DataError
from wsss.formats.torch_files import refused_global
from wsss.io import atomic_path

CAM_KEYS = ("keys", "cam", "high_res")  # what a complete CAM file of ours holds
STRIDE = 4  # ``cam``'s grid: IRN's stride-4 feature maps, ((H - 1) // 4 + 1, (W - 1) // 4 + 1) cells


def _latin1_bytes(text, encoding):
    """``_codecs.encode`` as protocol-2 pickles use it: Python 3 writes bytes for Python 2 readers as
    ``_codecs.encode(<the bytes as latin-1 text>, 'latin1')``. Any other codec or argument is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing to load _codecs.encode({type(text).__name__}, {encoding!r}): only (str, 'latin1') is allowed")
    return text.encode("latin-1")


def _empty_bytes():
    """``bytes()`` with no argument: how protocol 2 writes ``b""`` (the data of an empty array)."""
    return b""


def _storage_from_bytes(data):
    """Stands in for ``torch.storage._load_from_bytes``, which unpickles a pickled tensor's storage
    with ``weights_only=False`` (so could run code): here only tensors and plain containers load."""
    import torch

    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing to load torch.storage._load_from_bytes({type(data).__name__}): bytes expected")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"refusing to load a pickled torch storage holding objects other than tensors{refused_global(exc)}") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for foreign ``.npy`` files (IRN's dicts) that rebuilds dicts, lists, NumPy arrays and
    torch tensors but refuses every other global, so a crafted file cannot run code (plain
    ``np.load(allow_pickle=True)`` would). The three functions such files name that could do more
    than that (``_codecs.encode``, ``bytes``, torch's ``_load_from_bytes``) are replaced by safe ones."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "slice"),
        # A pickled tensor: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict()).
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("collections", "OrderedDict"),
    }
    _SUBSTITUTES = {
        ("_codecs", "encode"): _latin1_bytes,
        ("builtins", "bytes"): _empty_bytes,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2 names builtins the Python 2 way
            module = "builtins"
        if (module, name) in self._SUBSTITUTES:
            return self._SUBSTITUTES[module, name]
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")) or module == "numpy.dtypes":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays, torch tensors and plain containers are allowed")


def load_pickled_npy(path: str | Path) -> Any:
    """Load an ``.npy`` that holds a pickled object (IRN's dicts) without executing foreign code.

    Returns the stored object (a 0-d object array is unwrapped); plain numeric arrays load normally.
    Pickles of any protocol load, including protocol 2 (IRN's ``cls_labels.npy``), and torch tensors
    in them (IRN's CAM files) come back as CPU tensors.
    Raises DataError naming the file on any problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(handle)
            if dtype.hasobject:
                value = _RestrictedUnpickler(handle).load()
                if isinstance(value, np.ndarray) and value.shape == () and value.dtype == object:
                    value = value.item()
                return value
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None


def _tensor_as_numpy(value: Any) -> Any:
    """A torch tensor as NumPy: integers as int64, floating point as float32, other dtypes unchanged
    (for the checks to refuse); anything else is returned as is."""
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.float()
    elif not value.is_complex() and value.dtype != torch.bool:
        value = value.long()
    return value.numpy()


def irn_cam_arrays(data: dict[str, Any]) -> dict[str, Any]:
    """An IRN ``make_cam.py`` dict (as loaded) with torch tensors converted to NumPy arrays (contents
    not checked: :func:`wsss.formats.cams.read_cams` does that)."""
    return {key: _tensor_as_numpy(value) for key, value in data.items()}


def is_complete_irn_cams(path: Path) -> bool:
    """True when ``path`` is a complete IRN CAM file holding ``keys``, ``cam`` and ``high_res``
    (resume test: a file without ``cam``, as this project wrote before, is redone, since IRN's
    make_sem_seg_labels.py needs it)."""
    try:
        value = load_pickled_npy(path)
    except DataError:
        return False
    return isinstance(value, dict) and all(key in value for key in CAM_KEYS)


def strided_size(height: int, width: int) -> tuple[int, int]:
    """IRN's ``get_strided_size(size, 4)``: the cells of the stride-4 grid over an H x W image."""
    return (height - 1) // STRIDE + 1, (width - 1) // STRIDE + 1


def strided_cam(high_res: np.ndarray) -> np.ndarray:
    """``high_res`` (K, H, W) on IRN's stride-4 grid, as ``make_cam.py``'s ``cam``: (K, h, w) float32
    with h, w = :func:`strided_size`, each class map divided by its maximum (so 1 at its peak; an
    all-zero map stays 0).

    Cell (i, j) is the mean of the image pixels [4i, 4i + 4) x [4j, 4j + 4) (the last row and
    column of cells average the pixels that exist). That is the footprint IRN's reader gives it:
    make_sem_seg_labels.py upsamples ``cam`` x4 (bilinear, align_corners=False, which puts cell i's
    centre at pixel 4i + 1.5) and crops to H x W. Sampling every 4th pixel instead would shift the
    maps by 1.5 pixels and alias; the mean is the area-weighted downsampling.
    """
    maps = np.asarray(high_res, dtype=np.float64)
    count, height, width = maps.shape
    rows, cols = strided_size(height, width)
    padded = np.zeros((count, rows * STRIDE, cols * STRIDE))
    padded[:, :height, :width] = maps
    sums = padded.reshape(count, rows, STRIDE, cols, STRIDE).sum(axis=(2, 4))
    pixels_per_row = np.minimum(STRIDE, height - STRIDE * np.arange(rows))
    pixels_per_col = np.minimum(STRIDE, width - STRIDE * np.arange(cols))
    means = sums / np.outer(pixels_per_row, pixels_per_col)
    peaks = means.max(axis=(1, 2), keepdims=True)
    return np.where(peaks > 0, means / np.where(peaks > 0, peaks, 1.0), 0.0).astype(np.float32)


def write_irn_cams(path: str | Path, keys: np.ndarray, high_res: np.ndarray) -> None:
    """Write one image's maps in IRN's ``make_cam.py`` layout to ``path`` (a ``.npy``), atomically:
    the pickled dict ``{"keys": (K,) int64 tensor of 0-based class indices, "cam": (K, h, w) float32
    tensor (:func:`strided_cam` of ``high_res``), "high_res": (K, H, W) float32 array}``, which IRN's
    later steps read with ``np.load(path, allow_pickle=True).item()``.

    The values are deterministic, the bytes are not quite: torch pickles a tensor's storage under
    its memory address, as it does in IRN's own files.
    """
    import torch

    high_res = np.asarray(high_res, dtype=np.float32)
    cams = {"keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)), "cam": torch.from_numpy(strided_cam(high_res)),
            "high_res": high_res}
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, cams, allow_pickle=True)


def read_label_table(path: str | Path) -> dict:
    """IRN's ``cls_labels.npy``: a dict image id (str, or IRN's integer) -> float[20] multi-hot row."""
    table = load_pickled_npy(path)
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected an IRN-style cls_labels.npy holding a dict id -> float[20]")
    return table
