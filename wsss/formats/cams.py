"""CAM files, one per image: written by ``wsss cams``, read by ``pseudo-labels``, ``eval-cams`` and the report.

Three layouts, looked up as ``CAMDIR/<id>.npz`` first, then ``CAMDIR/<id>.npy``:

- ``.npz`` (ours): ``classes`` (K,) integers, the VOC label values 1..20, and ``cams`` (K, H, W)
  floating point in [0, 1] at the image size (``wsss cams`` writes float16, fused across layers).
  With ``--save-layers`` also one normalised (K, H, W) map per layer, stored under the layer's name
  (``stage3``, ...); any of them can be read instead of ``cams`` (``key``), and ``stage4+stage5``
  reads the element-wise maximum of those saved layers.
- ``.npy`` holding a dict with string keys: IRN's ``make_cam.py`` layout (also ``wsss cams --format
  irn``, :mod:`wsss.formats.irn`): ``keys`` (K,) the *0-based foreground* class indices (label
  value - 1, no background entry), ``high_res`` (K, H, W) maps in [0, 1] at the image size, and
  ``cam``, the maps on IRN's stride-4 grid. ``high_res`` is read; ``cam`` only when ``high_res`` is
  absent, and must then be at the image size too (a stride-4 ``cam`` is refused as the wrong size
  by the stages). Files whose maps carry a background channel (K + 1 maps, as IRN's evaluation
  pads them in memory) are refused.
- ``.npy`` holding a dict with integer keys (or none): PSA's ``infer_cls.py`` layout (also ``wsss
  cams --format psa``, :mod:`wsss.formats.psa`): ``{0-based class index: (H, W) map in [0, 1]}``.

The two ``.npy`` layouts are told apart by their keys, never by the folder or a flag: IRN's are the
strings ``keys``/``cam``/``high_res``, PSA's are class numbers; a dict mixing the two is refused.
Every read validates (shape, dtype, finite, [0, 1], classes 1..20 and distinct) and raises a
DataError naming the file: a bad file is never a silently wrong label.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsss.classes import NUM_CLASSES, class_ids_from, label_values_of
from wsss.errors import DataError
from wsss.formats import irn, psa
from wsss.io import atomic_path

NPZ_KEYS = ("classes", "cams")  # what a complete .npz holds
SUFFIX_OF_FORMAT = {"npz": ".npz", "irn": ".npy", "psa": ".npy"}  # ``wsss cams --format`` -> file suffix
SUFFIXES = tuple(dict.fromkeys(SUFFIX_OF_FORMAT.values()))  # lookup order: .npz wins
FUSE_SEPARATOR = "+"  # ``key="stage4+stage5"``: the element-wise maximum of saved per-layer maps


# ----------------------------------------------------------------------------- writing


def write_cams(path: str | Path, classes: np.ndarray, cams: np.ndarray, **layer_maps: np.ndarray) -> None:
    """Write one image's ``.npz``, atomically: ``classes`` (K,) label values 1..20, ``cams`` (K, H, W),
    and optional per-layer maps named after their layer (arrays are stored as given).

    Deterministic, so runs can be compared file by file: ``np.savez`` writes each entry through
    ``ZipFile.open(name, "w")``, which stamps the fixed date 1980-01-01, never the current time.
    """
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, classes=classes, cams=cams, **layer_maps)


def write_cam_file(path: Path, output_format: str, classes: np.ndarray, cams: np.ndarray,
                   layer_maps: dict[str, np.ndarray] | None = None) -> None:
    """One image's maps in the layout of ``output_format``: ``npz`` (``cams`` stored as float16, with
    ``layer_maps``), ``irn`` or ``psa`` (float32 maps, 0-based class indices, no room for per-layer
    maps). ``classes`` are label values 1..20."""
    if output_format == "irn":
        irn.write_irn_cams(path, class_ids_from(classes), cams)
    elif output_format == "psa":
        psa.write_psa_cams(path, class_ids_from(classes), cams)
    else:
        write_cams(path, classes, cams.astype(np.float16), **(layer_maps or {}))


# ----------------------------------------------------------------------------- lookup


def cam_path(cam_dir: Path, image_id: str, output_format: str = "npz") -> Path:
    """Where ``wsss cams --format output_format`` writes the maps of ``image_id``."""
    return cam_dir / f"{image_id}{SUFFIX_OF_FORMAT[output_format]}"


def find_cam_files(cam_dir: Path, ids: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """The CAM file of every id (``<id>.npz``, else ``<id>.npy``) and the ids that have none, so all
    of them can be reported at once."""
    if not cam_dir.is_dir():
        raise DataError(f"CAM directory not found: {cam_dir}")
    present = {entry.name for entry in os.scandir(cam_dir)}  # one listdir, not two stats per id
    found: dict[str, Path] = {}
    missing: list[str] = []
    for image_id in ids:
        name = next((f"{image_id}{suffix}" for suffix in SUFFIXES if f"{image_id}{suffix}" in present), None)
        if name is None:
            missing.append(image_id)
        else:
            found[image_id] = cam_dir / name
    return found, missing


def list_cam_ids(cam_dir: Path) -> list[str]:
    """Sorted ids of the CAM files in ``cam_dir`` (hidden files, such as a writer's temporary file, are
    never outputs)."""
    if not cam_dir.is_dir():
        raise DataError(f"CAM directory not found: {cam_dir}")
    return sorted({entry.name.rsplit(".", 1)[0] for entry in os.scandir(cam_dir)
                   if entry.name.endswith(SUFFIXES) and not entry.name.startswith(".")})


def cam_files_in(cam_dir: Path) -> list[Path]:
    """Every CAM file (any layout) in ``cam_dir``; none when it does not exist."""
    if not cam_dir.is_dir():
        return []
    return [Path(entry.path) for entry in os.scandir(cam_dir) if entry.name.endswith(SUFFIXES) and not entry.name.startswith(".")]


def is_complete(path: Path, output_format: str = "npz") -> bool:
    """True when ``path`` is a complete CAM file of ``output_format``'s layout (the test for "already
    done" when ``wsss cams`` resumes; an IRN file is not a complete PSA one, nor the reverse); its
    values are not checked."""
    if output_format == "irn":
        return irn.is_complete_irn_cams(path)
    if output_format == "psa":
        return psa.is_complete_psa_cams(path)
    try:
        with np.load(path) as data:
            return all(key in data.files for key in NPZ_KEYS)
    except Exception:  # missing, truncated, not a zip: not done
        return False


# ----------------------------------------------------------------------------- reading


def _check_maps(path: Path, name: str, maps: Any, classes: np.ndarray) -> np.ndarray:
    if not isinstance(maps, np.ndarray):
        raise DataError(f"{path}: '{name}' must be a NumPy array, got {type(maps).__name__}")
    if maps.ndim != 3:
        raise DataError(f"{path}: '{name}' must have shape (K, H, W), got {maps.shape}")
    if maps.dtype.kind != "f":
        raise DataError(f"{path}: '{name}' must be floating point, got dtype {maps.dtype}")
    if maps.shape[0] != len(classes):
        raise DataError(f"{path}: '{name}' holds {maps.shape[0]} maps for {len(classes)} classes")
    if maps.size:
        if not np.isfinite(maps).all():
            raise DataError(f"{path}: '{name}' contains NaN or Inf")
        low, high = float(maps.min()), float(maps.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f"{path}: '{name}' must lie in [0, 1], found values in [{low:g}, {high:g}]")
    return maps


def _check_classes(path: Path, name: str, values: Any, zero_based: bool, num_classes: int) -> np.ndarray:
    """Label values (1..num_classes) from ``values``: label values, or with ``zero_based`` IRN's/PSA's class indices."""
    classes = np.asarray(values)
    if classes.ndim != 1 or (classes.size and classes.dtype.kind not in "iu"):
        raise DataError(f"{path}: '{name}' must be a 1-D integer array, got shape {classes.shape} dtype {classes.dtype}")
    as_stored = classes.tolist()  # the messages show the values as the file holds them
    classes = label_values_of(classes) if zero_based else classes.astype(np.int64)
    allowed = f"0..{num_classes - 1} (0-based, no background)" if zero_based else f"1..{num_classes}"
    if classes.size and (classes.min() < 1 or classes.max() > num_classes):
        raise DataError(f"{path}: '{name}' values must be in {allowed}, got {as_stored}")
    if len(np.unique(classes)) != len(classes):
        raise DataError(f"{path}: '{name}' has repeated classes {as_stored}")
    return classes


def _read_npz(path: Path, key: str | None, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    name = key or "cams"
    parts = name.split(FUSE_SEPARATOR)
    try:
        with np.load(path, allow_pickle=False) as data:
            absent = [k for k in ("classes", *parts) if k not in data.files]
            if absent:
                raise DataError(f"{path}: missing arrays {absent} (has {sorted(data.files)})")
            raw_classes, part_maps = data["classes"], [data[part] for part in parts]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # zip/pickle/format errors: the file is damaged or not an npz
        raise DataError(f"{path}: cannot read CAM file ({type(exc).__name__}: {exc})") from None
    classes = _check_classes(path, "classes", raw_classes, zero_based=False, num_classes=num_classes)
    if len(parts) == 1:
        return part_maps[0], classes, name
    # "stage4+stage5": eq. 9's fusion of those layers without tanh scaling (they are stored
    # normalised at the image size), i.e. their element-wise maximum.
    checked = [_check_maps(path, part, maps, classes) for part, maps in zip(parts, part_maps)]
    if len({maps.shape for maps in checked}) > 1:
        raise DataError(f"{path}: arrays {parts} differ in shape ({[maps.shape for maps in checked]}); they cannot be fused")
    return np.maximum.reduce(checked), classes, name


def npy_layout(path: Path, data: Any) -> str:
    """``"irn"`` or ``"psa"``: which layout the loaded ``.npy`` object ``data`` is in, from its keys
    (IRN's are strings, PSA's class indices; an empty dict is PSA's image without classes)."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a CAM dict (IRN's with 'keys' and 'high_res', or PSA's class index -> map), got {type(data).__name__}")
    named = [key for key in data if isinstance(key, str)]
    if not named:
        return "psa"
    if len(named) < len(data):
        others = [key for key in data if not isinstance(key, str)]
        raise DataError(f"{path}: the dict mixes string keys {named[:5]} (IRN's layout) with others {others[:5]!r} (PSA's class indices)")
    return "irn"


def _read_irn(path: Path, data: dict, key: str | None, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    data = irn.irn_cam_arrays(data)
    name = key or ("cam" if "high_res" not in data and "cam" in data else "high_res")
    absent = [k for k in ("keys", name) if k not in data]
    if absent:
        raise DataError(f"{path}: missing entries {absent} (has {sorted(map(str, data))})")
    maps = data[name]
    classes = _check_classes(path, "keys", data["keys"], zero_based=True, num_classes=num_classes)
    if isinstance(maps, np.ndarray) and maps.ndim == 3 and maps.shape[0] == len(classes) + 1:
        raise DataError(
            f"{path}: '{name}' has {maps.shape[0]} maps for {len(classes)} keys; a background channel "
            "is not accepted: store only the foreground maps with 0-based keys"
        )
    return maps, classes, name


def _read_psa(path: Path, data: dict, key: str | None, image_size: tuple[int, int] | None, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    if key is not None:
        raise DataError(f"{path}: a PSA CAM file holds one map per class and no named arrays; key {key!r} does not apply")
    indices, maps = psa.psa_class_maps(path, data)
    if maps is None:  # no classes, so no map to take the size from
        maps = np.zeros((0, *(image_size or (0, 0))), np.float32)
    return maps, _check_classes(path, "class indices", indices, zero_based=True, num_classes=num_classes), "maps"


def read_cams(path: str | Path, key: str | None = None, image_size: tuple[int, int] | None = None,
              num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CAM file of any layout (see the module docstring).

    Args:
        path: ``<id>.npz``, or ``<id>.npy`` in IRN's or PSA's layout.
        key: array holding the maps; default ``cams`` (npz) or ``high_res``/``cam`` (IRN). A
            per-layer array (e.g. ``stage3``) must have the same (K, H, W) layout in [0, 1];
            ``stage4+stage5`` fuses saved per-layer arrays by element-wise maximum (npz only).
            PSA files have no named arrays: a key is refused.
        image_size: the image's (H, W), used only for a PSA file without classes (an empty dict
            stores no size): its maps are then (0, H, W), else (0, 0, 0).
        num_classes: foreground classes of the dataset (VOC's 20; COCO's 80): label values above
            it are refused.

    Returns:
        ``(cams, classes)``: (K, H, W) float maps in [0, 1] and the (K,) int64 label values 1..num_classes.

    Raises:
        DataError naming the file: unreadable, missing keys, wrong dtype/shape, NaN/Inf, out of range.
    """
    path = Path(path)
    if path.suffix == ".npz":
        maps, classes, name = _read_npz(path, key, num_classes)
    elif path.suffix == ".npy":
        data = irn.load_pickled_npy(path)
        if npy_layout(path, data) == "psa":
            maps, classes, name = _read_psa(path, data, key, image_size, num_classes)
        else:
            maps, classes, name = _read_irn(path, data, key, num_classes)
    else:
        raise DataError(f"{path}: CAM files must be .npz or .npy")
    return _check_maps(path, name, maps, classes), classes
