"""Label maps as PNGs: GT masks, pseudo-labels and predictions (``<id>.png``).

A label map is an (H, W) uint8 array: 0 background, 1..20 the VOC classes, 255 ignored. Written as
VOC-palette (mode P) PNGs, VOC's own format, or as 8-bit grayscale (mode L) PNGs
(``png_mode="gray"``, as IRN writes its labels); read from palette or single-channel PNGs by index
(colours ignored).

Both modes hold the same indices, but readers differ: PIL returns a palette PNG's indices, while
imageio (IRN's and PSA's reader) converts it to its RGB colours and ``cv2.imread`` to BGR (or, with
``IMREAD_GRAYSCALE``, to the colours' luminance). All of them return a grayscale PNG's values as
they are.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.classes import LABEL_SETS, LabelSet, voc_palette
from wsss.errors import ConfigError, DataError
from wsss.formats.images import decode, image_info, open_header
from wsss.io import atomic_path

SUFFIX = ".png"
PIL_MODE_OF_PNG_MODE = {"palette": "P", "gray": "L"}  # ``--png-mode`` -> the PIL mode written
PNG_MODES = tuple(PIL_MODE_OF_PNG_MODE)
PNG_MODE_HELP = ("palette: VOC-palette PNGs (VOC's format; PIL reads the indices); gray: 8-bit grayscale PNGs of the same "
                 "indices, for readers that decode a palette to colours (imageio, cv2)")


def _values_present(label_map: np.ndarray) -> np.ndarray:
    """Sorted distinct values: a 256-bin count for uint8 maps (no sort), np.unique otherwise."""
    if label_map.dtype == np.uint8:
        return np.flatnonzero(np.bincount(label_map.reshape(-1), minlength=256))
    return np.unique(label_map)


@functools.cache
def _allowed_values(labels: LabelSet) -> np.ndarray:
    """(256,) bool: the label values, the ignore value and 255 (a prediction's unlabelled)."""
    allowed = np.zeros(256, bool)
    allowed[: labels.num_labels] = allowed[labels.ignore] = allowed[255] = True
    return allowed


def read_label_png(path: str | Path, check_values: bool = True, labels: LabelSet = LABEL_SETS["voc"]) -> np.ndarray:
    """Label map of an index or palette PNG as (H, W) uint8.

    With ``check_values`` every value must be one of ``labels`` (VOC: 0..20), its ignore value or
    255 (DataError naming the file and the bad values otherwise). Without it, values of 16/32-bit
    PNGs must still fit in uint8: they are never wrapped (300 would become 44). An RGB PNG is refused: its colours would have to be guessed back
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
        bad = present[(present < 0) | (present > 255) | ~_allowed_values(labels)[np.clip(present, 0, 255)]]
        if bad.size:
            extra = ", ".join(map(str, sorted({labels.ignore, 255})))
            raise DataError(f"{path}: label values outside 0..{labels.num_labels - 1} and {extra}: {bad[:10].tolist()}")
    elif label_map.dtype != np.uint8:
        present = _values_present(label_map)
        bad = present[(present < 0) | (present > 255)]
        if bad.size:
            raise DataError(f"{path}: label values outside 0..255: {bad[:10].tolist()}")
    return label_map.astype(np.uint8)


def check_png_mode(png_mode: str, option: str = "--png-mode") -> None:
    """ConfigError naming ``option`` unless ``png_mode`` is one of :data:`PNG_MODES`."""
    if png_mode not in PIL_MODE_OF_PNG_MODE:
        raise ConfigError(f"{option} {png_mode!r} unknown; choose one of {', '.join(PNG_MODES)}")


def write_label_png(path: str | Path, label_map: np.ndarray, png_mode: str = "palette") -> None:
    """Write a (H, W) uint8 label map atomically, as a VOC-palette PNG (``palette``) or an 8-bit
    grayscale one (``gray``); the values are the same."""
    check_png_mode(png_mode, "png_mode")
    image = Image.fromarray(np.asarray(label_map, dtype=np.uint8), mode=PIL_MODE_OF_PNG_MODE[png_mode])
    if png_mode == "palette":
        image.putpalette(voc_palette())
    with atomic_path(path, SUFFIX) as tmp:
        image.save(tmp, format="PNG")


def png_mode_of(path: Path) -> str | None:
    """``palette`` or ``gray``: the mode of the label PNG at ``path``, from its header (None for any
    other mode); DataError if it is not a readable image."""
    pil_mode = image_info(path).mode
    return next((mode for mode, pil in PIL_MODE_OF_PNG_MODE.items() if pil == pil_mode), None)


def is_valid_label_png(path: Path, size: tuple[int, int] | None = None, png_mode: str | None = None,
                       labels: LabelSet = LABEL_SETS["voc"]) -> bool:
    """True when ``path`` is a complete label PNG with valid values (and ``(H, W)`` == ``size``, and
    written in ``png_mode`` when given): the test for "already done" when a stage resumes, so a
    palette PNG is redone when gray ones are asked for, and the reverse."""
    if not path.is_file():
        return False
    try:
        if png_mode is not None and png_mode_of(path) != png_mode:
            return False
        label_map = read_label_png(path, labels=labels)
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


def missing_label_pngs(directory: Path, ids: Sequence[str], png_mode: str | None = None) -> list[str]:
    """Ids without ``directory/<id>.png`` (one listdir, not one stat per id); with ``png_mode``, also
    those whose PNG is of the other mode or unreadable (one header read per PNG present)."""
    present = _names_in(directory)

    def written_in_mode(image_id: str) -> bool:
        try:
            return png_mode_of(directory / f"{image_id}{SUFFIX}") == png_mode
        except DataError:
            return False

    return [i for i in ids if f"{i}{SUFFIX}" not in present or (png_mode is not None and not written_in_mode(i))]
