"""Input images: RGB pixels or header-only size look-ups, with the checks every image reader shares."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import DataError

# Refuse images whose decoded size would take more than this many pixels (~ 8k x 8k is 64 MP);
# PIL's own bomb check only warns below 179 MP.
MAX_IMAGE_PIXELS = 40_000_000


class ImageInfo(NamedTuple):
    """What an image file's header says, read without decoding a pixel."""

    height: int
    width: int
    mode: str


def open_header(path: Path) -> Image.Image:
    """``Image.open`` (header only) with the checks every image reader shares: the file exists, is
    not empty, is an image, and is at most MAX_IMAGE_PIXELS, refused before any pixel is decoded."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (0 bytes)")
        image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image is larger than the {MAX_IMAGE_PIXELS:,} pixels this pipeline accepts ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(
            f"{path}: image is {image.width}x{image.height}, more than the {MAX_IMAGE_PIXELS:,} pixels "
            "this pipeline accepts; downscale it first"
        )
    return image


def decode(image: Image.Image, path: Path) -> Image.Image:
    """Decode the pixels of an image opened by :func:`open_header`, so truncation is reported here
    (naming ``path``), not deep inside a transform."""
    try:
        image.load()
    except Exception as exc:  # any decoder failure (OSError, SyntaxError, zlib.error, ...) is this file's fault
        raise DataError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {exc})") from None
    return image


def image_info(path: str | Path) -> ImageInfo:
    """Size and mode of an image from its header alone, with the same checks and errors as
    :func:`read_image` (empty, unreadable, too large), for size look-ups that must not decode."""
    path = Path(path)
    with open_header(path) as image:
        return ImageInfo(image.height, image.width, image.mode)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image from its header, without decoding it."""
    info = image_info(path)
    return info.height, info.width


def is_deeper_than_8_bits(mode: str) -> bool:
    """True for PIL modes with more than 8 bits per sample (``I``, ``F``, ``I;16``, ...)."""
    return mode in ("I", "F") or mode.startswith("I;")


def read_image(path: str | Path) -> np.ndarray:
    """RGB image as (H, W, 3) uint8; grayscale, CMYK, palette and RGBA images are converted.

    16-bit and floating-point images are refused: PIL's conversion to RGB clips them to white or
    black, which would be a silently wrong input.
    """
    path = Path(path)
    image = open_header(path)
    if is_deeper_than_8_bits(image.mode):
        image.close()
        raise DataError(f"{path}: mode {image.mode} image (more than 8 bits per sample) is not supported; convert it to 8-bit RGB first")
    image = decode(image, path)
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")  # RGBA: alpha dropped; CMYK/L/P: colour-converted
        except ValueError as exc:  # modes PIL cannot convert (LAB, HSV)
            raise DataError(f"{path}: cannot convert a mode {image.mode} image to RGB ({exc})") from None
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
