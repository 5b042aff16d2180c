"""PSA's CAM files (jiwoon-ahn/psa), read without running pickled code.

``infer_cls.py --out_cam`` saves, per image, ``np.save(<id>.npy, cam_dict)`` with ``cam_dict`` a
dict ``{0-based class index (int): (H, W) float32 map in [0, 1]}`` holding the image's classes;
PSA's random walk (``infer_aff.py --cam_dir``) reads it with ``np.load(path,
allow_pickle=True).item()`` and fills a (21, H, W) array from ``.items()`` (background first, as
``(1 - max) ** alpha``). :func:`write_psa_cams` writes that dict; :func:`psa_class_maps` checks one
as loaded and stacks its maps; :func:`wsss.formats.cams.read_cams` validates their values.

An image without classes gets an empty dict (PSA's own images always have one; its
``infer_aff.py`` cannot read an empty one). PSA's ``--out_la_crf``/``--out_ha_crf`` files are not
CAM files: their key 0 is the background and the classes are 1-based.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np

from wsss.classes import NUM_CLASSES
from wsss.errors import DataError
from wsss.formats.irn import load_pickled_npy
from wsss.io import atomic_path


def is_class_index(key: Any) -> bool:
    """A PSA dict key: an integer (Python's, or a NumPy integer), never a bool."""
    return isinstance(key, numbers.Integral) and not isinstance(key, (bool, np.bool_))


def psa_class_maps(path: Path, data: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """``(class_indices, maps)`` of a loaded PSA dict: (K,) int64 0-based indices in increasing
    order and their (K, H, W) maps, or None for an empty dict (no maps, so no size).

    DataError naming ``path`` unless every key is an integer and every value a 2-D floating point
    NumPy array, all of one shape. The indices' range (0..19) and the maps' values are checked by
    the caller, as for the other layouts."""
    bad_keys = [key for key in data if not is_class_index(key)]
    if bad_keys:
        raise DataError(f"{path}: a PSA CAM dict's keys must be integer class indices 0..{NUM_CLASSES - 1}, got {bad_keys[:10]!r}")
    indices = sorted(int(key) for key in data)
    by_index = {int(key): value for key, value in data.items()}
    for index in indices:
        value = by_index[index]
        if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind != "f":
            what = f"shape {value.shape} dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise DataError(f"{path}: the map of class index {index} must be a 2-D floating point NumPy array (H, W), got {what}")
    shapes = {by_index[index].shape for index in indices}
    if len(shapes) > 1:
        raise DataError(f"{path}: the PSA maps differ in shape ({ {index: by_index[index].shape for index in indices} }); one image has one size")
    if not indices:
        return np.zeros(0, np.int64), None
    return np.array(indices, dtype=np.int64), np.stack([by_index[index] for index in indices])


def is_complete_psa_cams(path: Path) -> bool:
    """True when ``path`` holds a PSA CAM dict (every key a class index; possibly empty): the resume
    test. An IRN dict (string keys) is not one."""
    try:
        value = load_pickled_npy(path)
    except DataError:
        return False
    return isinstance(value, dict) and all(is_class_index(key) for key in value)


def write_psa_cams(path: str | Path, class_indices: np.ndarray, maps: np.ndarray) -> None:
    """Write one image's maps in PSA's ``infer_cls.py`` layout to ``path`` (a ``.npy``), atomically:
    the pickled dict ``{int 0-based class index: (H, W) float32 map}``, in the order given (ours are
    increasing, like PSA's)."""
    maps = np.asarray(maps, dtype=np.float32)
    cam_dict = {int(index): maps[n] for n, index in enumerate(np.asarray(class_indices))}
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, cam_dict, allow_pickle=True)
