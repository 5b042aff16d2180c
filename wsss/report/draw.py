"""Pure drawing for the report: heatmaps and label colours over images, tiles, sheets (Pillow only, no files)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.classes import IGNORE_INDEX, LABEL_NAMES, voc_colormap

# (title, source, npz key or None); source is "image", "gt", a cams/<method> or pseudo/<method>
# folder, or "prediction".
COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("image", "image", None),
    ("GT", "gt", None),
    ("Grad-CAM s5", "cams/gradcam", "cams"),
    ("LayerCAM s3", "cams/layercam", "stage3"),
    ("LayerCAM s4", "cams/layercam", "stage4"),
    ("LayerCAM s5", "cams/layercam", "stage5"),
    ("LayerCAM fused", "cams/layercam", "cams"),
    ("pseudo-label", "pseudo/layercam", None),
    ("prediction", "prediction", None),
)
# With `refine.enabled` a run has refined maps: shown next to the fused map they were refined from.
REFINED_COLUMN = ("LayerCAM + RW", "refined/layercam/cams", "cams")
NUM_COLUMNS = len(COLUMNS)


def columns_with_refined(refined: bool) -> tuple[tuple[str, str, str | None], ...]:
    """:data:`COLUMNS`, with :data:`REFINED_COLUMN` after the fused LayerCAM when ``refined``."""
    if not refined:
        return COLUMNS
    fused = next(i for i, column in enumerate(COLUMNS) if column[0] == "LayerCAM fused")
    return (*COLUMNS[:fused + 1], REFINED_COLUMN, *COLUMNS[fused + 1:])
DEFAULT_TILE = 160  # tile side in pixels; images are fitted inside, keeping their aspect ratio
MARGIN = 4  # pixels around and between tiles
HEADER_HEIGHT = 18  # the column-title row at the top of every sheet
IMAGES_PER_SHEET = 6
CAM_ALPHA = 0.5  # weight of the heatmap over the image
LABEL_ALPHA = 0.6  # weight of the VOC colours over the image
BACKGROUND = (255, 255, 255)
NA_GREY = (128, 128, 128)
CAPTION_HEIGHT = 13


def sheet_size(num_rows: int, tile: int = DEFAULT_TILE, num_columns: int = NUM_COLUMNS) -> tuple[int, int]:
    """(width, height) in pixels of a sheet (or a ``show`` image) with ``num_rows`` image rows."""
    width = MARGIN + num_columns * (tile + MARGIN)
    height = HEADER_HEIGHT + MARGIN + num_rows * (tile + MARGIN)
    return width, height


def jet(values: np.ndarray) -> np.ndarray:
    """Jet colormap: float array in [0, 1] (any shape) -> uint8 RGB with a trailing axis of 3."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # R, G, B peaks
    rgb = np.clip(1.5 - np.abs(4.0 * x - 4.0 * centres), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _colour_table() -> np.ndarray:
    table = np.array(voc_colormap(256), dtype=np.uint8)
    table[IGNORE_INDEX] = (255, 255, 255)  # "don't know" / boundary: white
    return table


_COLOURS = _colour_table()


def blend(base: np.ndarray, top: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * base.astype(np.float32) + alpha * top.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def cam_overlay(image: np.ndarray | None, cam: np.ndarray) -> np.ndarray:
    """Jet heatmap of one (H, W) map in [0, 1] blended over the (H, W, 3) image (or alone)."""
    heat = jet(cam)
    if image is None:
        return heat
    return blend(image, heat, CAM_ALPHA)


def label_overlay(image: np.ndarray | None, label_map: np.ndarray) -> np.ndarray:
    """VOC colours of a (H, W) label map blended over the image (background dims it)."""
    colours = _COLOURS[label_map]
    if image is None:
        return colours
    return blend(image, colours, LABEL_ALPHA)


def present_classes(label_map: np.ndarray, names: Sequence[str] = LABEL_NAMES) -> list[str]:
    """Names of the foreground label values in ``label_map`` (``names[v]`` is value ``v``, 0 background)."""
    values = np.flatnonzero(np.bincount(label_map.reshape(-1), minlength=256)[1:len(names)]) + 1
    return [names[v] for v in values]


def resize_to(array: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize a (h, w) map or (h, w, 3) image to ``size_hw`` if it differs."""
    if array.shape[:2] == tuple(size_hw):
        return array
    h, w = size_hw
    if array.ndim == 2 and not nearest:
        resized = Image.fromarray(array.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
        return np.asarray(resized)
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((w, h), method))


_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    if draw.textlength(text, font=_font()) <= width:
        return text
    while text and draw.textlength(text + "...", font=_font()) > width:
        text = text[:-1]
    return text + "..."


def _caption(tile: Image.Image, text: str) -> None:
    """Write ``text`` on a dark strip along the tile's top edge."""
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, tile.width, CAPTION_HEIGHT], fill=(0, 0, 0))
    draw.text((2, 0), _fit_text(draw, text, tile.width - 4), fill=(255, 255, 255), font=_font())


def fit_tile(rgb: np.ndarray, tile: int, caption: str = "") -> Image.Image:
    """An (H, W, 3) uint8 picture scaled into a ``tile`` x ``tile`` square (aspect kept, dark padding)."""
    picture = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    scale = tile / max(picture.width, picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.BILINEAR)
    canvas = Image.new("RGB", (tile, tile), (32, 32, 32))
    canvas.paste(picture, ((tile - size[0]) // 2, (tile - size[1]) // 2))
    if caption:
        _caption(canvas, caption)
    return canvas


def na_tile(tile: int, reason: str = "") -> Image.Image:
    """Grey ``n/a`` tile, with a short reason under it."""
    canvas = Image.new("RGB", (tile, tile), NA_GREY)
    draw = ImageDraw.Draw(canvas)
    for text, y in (("n/a", tile // 2 - 12), (reason, tile // 2 + 2)):
        if text:
            text = _fit_text(draw, text, tile - 6)
            x = (tile - draw.textlength(text, font=_font())) / 2
            draw.text((x, y), text, fill=(255, 255, 255), font=_font())
    return canvas


def compose(rows: Sequence[Sequence[Image.Image]], tile: int = DEFAULT_TILE, columns: Sequence[tuple] = COLUMNS) -> Image.Image:
    """Stack rows of tiles under a column-title header into one sheet of :func:`sheet_size`."""
    sheet = Image.new("RGB", sheet_size(len(rows), tile, len(columns)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for col, (title, _, _) in enumerate(columns):
        x = MARGIN + col * (tile + MARGIN)
        text = _fit_text(draw, title, tile)
        draw.text((x + (tile - draw.textlength(text, font=_font())) / 2, 3), text, fill=(0, 0, 0), font=_font())
    for r, row in enumerate(rows):
        y = HEADER_HEIGHT + MARGIN + r * (tile + MARGIN)
        for col, picture in enumerate(row):
            sheet.paste(picture, (MARGIN + col * (tile + MARGIN), y))
    return sheet


