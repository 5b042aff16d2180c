"""Label maps as PNGs: GT masks, pseudo-labels and predictions (``<id>.png``).

A label map is an (H, W) uint8 array: 0 background, 1..20 the VOC classes, 255 ignored. Written as
VOC-palette (mode P) PNGs; read from palette or single-channel PNGs by index (colours ignored).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.classes import IGNORE_INDEX, NUM_LABELS, voc_palette
from wsss.errors import DataError
from wsss.formats.images import decode, open_header
from wsss.io import atomic_path

SUFFIX = ".png"
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[[*range(NUM_LABELS), IGNORE_INDEX]] = True


def _values_present(label_map: np.ndarray) -> np.ndarray:
    """Sorted distinct values: a 256-bin count for uint8 maps (no sort), np.unique otherwise."""
    if label_map.dtype == np.uint8:
        return np.flatnonzero(np.bincount(label_map.reshape(-1), minlength=256))
    return np.unique(label_map)


def read_label_png(path: str | Path, check_values: bool = True) -> np.ndarray:
    """Label map of an index or palette PNG as (H, W) uint8.

    With ``check_values`` every value must be 0..20 or 255 (DataError naming the file and the bad
    values otherwise). Without it, values of 16/32-bit PNGs must still fit in uint8: they are never
    wrapped (300 would become 44). An RGB PNG is refused: its colours would have to be guessed back
    into labels.
    """
    path = Path(path)
    image = open_header(path)
    if image.mode not in ("P", "L", "I", "I;16"):
        image.close()
        raise DataError(f"{path}: label PNG must be a palette or single-channel image, got mode {image.mode}")
    label_map = np.asarray(decode(image, path))
    if check_values:
        present = _values_present(label_map)
        bad = present[(present < 0) | (present > 255) | ~_ALLOWED[np.clip(present, 0, 255)]]
        if bad.size:
            raise DataError(f"{path}: label values outside 0..{NUM_LABELS - 1} and {IGNORE_INDEX}: {bad[:10].tolist()}")
    elif label_map.dtype != np.uint8:
        present = _values_present(label_map)
        bad = present[(present < 0) | (present > 255)]
        if bad.size:
            raise DataError(f"{path}: label values outside 0..255: {bad[:10].tolist()}")
    return label_map.astype(np.uint8)


def write_label_png(path: str | Path, label_map: np.ndarray) -> None:
    """Write a (H, W) uint8 label map as a VOC-palette PNG, atomically."""
    image = Image.fromarray(np.asarray(label_map, dtype=np.uint8), mode="P")
    image.putpalette(voc_palette())
    with atomic_path(path, SUFFIX) as tmp:
        image.save(tmp, format="PNG")


def is_valid_label_png(path: Path, size: tuple[int, int] | None = None) -> bool:
    """True when ``path`` is a complete label PNG with valid values (and ``(H, W)`` == ``size``):
    the test for "already done" when a stage resumes."""
    if not path.is_file():
        return False
    try:
        label_map = read_label_png(path)
    except DataError:
        return False
    return size is None or label_map.shape == tuple(size)


def check_mask_size(mask_path: str | Path, mask_shape: tuple[int, ...], image_path: str | Path, image_shape: tuple[int, ...]) -> None:
    """DataError naming the mask unless its (H, W) is its image's: masks are never resized to fit,
    since a mask of another size almost always belongs to another image."""
    (mask_h, mask_w), (image_h, image_w) = tuple(mask_shape[:2]), tuple(image_shape[:2])
    if (mask_h, mask_w) != (image_h, image_w):
        raise DataError(f"{mask_path}: mask is {mask_w}x{mask_h} but its image {image_path} is {image_w}x{image_h}")


def _names_in(directory: Path) -> set[str]:
    if not directory.is_dir():
        raise DataError(f"directory not found: {directory}")
    return {entry.name for entry in os.scandir(directory)}


def list_label_ids(directory: Path) -> list[str]:
    """Sorted ids of the label PNGs in ``directory`` (hidden files, such as a writer's temporary
    file, are never outputs)."""
    return sorted(name[: -len(SUFFIX)] for name in _names_in(directory) if name.endswith(SUFFIX) and not name.startswith("."))


def label_pngs_in(directory: Path) -> list[Path]:
    """Every label PNG in ``directory``; none when it does not exist."""
    if not directory.is_dir():
        return []
    return [directory / f"{image_id}{SUFFIX}" for image_id in list_label_ids(directory)]


def missing_label_pngs(directory: Path, ids: Sequence[str]) -> list[str]:
    """Ids without ``directory/<id>.png`` (one listdir, not one stat per id)."""
    present = _names_in(directory)
    return [i for i in ids if f"{i}{SUFFIX}" not in present]
