"""Visual report of a pipeline run: ``wsss report OUT`` (contact sheets + index.html) and ``wsss show ID``.

Reads only files (the layout written by ``wsss run``, see the README) and draws with Pillow:

- one row per image: image, GT, Grad-CAM stage5, LayerCAM stage3/stage4/stage5, fused LayerCAM,
  pseudo-label, segmenter prediction (:data:`COLUMNS`);
- CAM tiles show the map of the image's **first** image-level class (``classes[0]`` of its npz) as a
  jet heatmap blended over the image, captioned ``"LayerCAM s3: cat"``;
- label tiles blend VOC colours over the image, captioned with the classes present;
- anything missing or unreadable becomes a grey ``n/a`` tile: a report never fails on one image.

Sheet geometry is fixed by the constants below (see :func:`sheet_size`), so tests and callers can
compute the expected size.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.classes import IGNORE_INDEX, LABEL_NAMES, voc_colormap
from wsss.errors import ConfigError, DataError
from wsss.formats.cams import read_cams
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png
from wsss.io import atomic_path

log = logging.getLogger(__name__)

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
NUM_COLUMNS = len(COLUMNS)
DEFAULT_TILE = 160  # tile side in pixels; images are fitted inside, keeping their aspect ratio
MARGIN = 4  # pixels around and between tiles
HEADER_HEIGHT = 18  # the column-title row at the top of every sheet
IMAGES_PER_SHEET = 6
CAM_ALPHA = 0.5  # weight of the heatmap over the image
LABEL_ALPHA = 0.6  # weight of the VOC colours over the image
BACKGROUND = (255, 255, 255)
NA_GREY = (128, 128, 128)
CAPTION_HEIGHT = 13


def sheet_size(num_rows: int, tile: int = DEFAULT_TILE) -> tuple[int, int]:
    """(width, height) in pixels of a sheet (or a ``show`` image) with ``num_rows`` image rows."""
    width = MARGIN + NUM_COLUMNS * (tile + MARGIN)
    height = HEADER_HEIGHT + MARGIN + num_rows * (tile + MARGIN)
    return width, height


# ----------------------------------------------------------------------------- pure drawing


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


def present_classes(label_map: np.ndarray) -> list[str]:
    values = np.flatnonzero(np.bincount(label_map.reshape(-1), minlength=256)[1:len(LABEL_NAMES)]) + 1
    return [LABEL_NAMES[v] for v in values]


def _resize_to(array: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
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


# ----------------------------------------------------------------------------- reading a run


@dataclass
class RunFiles:
    """Where one pipeline output folder keeps each input of a report row."""

    out_dir: Path
    layout: Any | None  # wsss.data.voc.VOCLayout, or None when no data root is known
    prediction_dirs: list[Path]  # searched in order for <id>.png

    def source_path(self, source: str, image_id: str) -> Path | None:
        if source == "image":
            return None if self.layout is None else self.layout.image_path(image_id)
        if source == "gt":
            return None if self.layout is None else self.layout.mask_path(image_id)
        if source == "prediction":
            return next((d / f"{image_id}.png" for d in self.prediction_dirs if (d / f"{image_id}.png").is_file()),
                        self.prediction_dirs[0] / f"{image_id}.png" if self.prediction_dirs else None)
        suffix = ".npz" if source.startswith("cams/") else ".png"
        return self.out_dir / source / f"{image_id}{suffix}"


def read_results(out_dir: Path) -> tuple[dict | None, str | None]:
    """(results.json as a dict, or None; a problem description, or None)."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None, f"no {path.name} in {out_dir}"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not isinstance(results, dict):
        return {"results": results}, None
    return results, None


def _open_run(out_dir: str | Path, data_root: str | Path | None, prediction_splits: Sequence[str] | None) -> RunFiles:
    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise DataError(f"pipeline output folder not found: {out_dir} (write one with `wsss run` or `wsss demo`)")
    if not any((out_dir / name).exists() for name in ("cams", "pseudo", "predictions", "results.json")):
        raise DataError(f"{out_dir} is not a pipeline output folder: it has none of cams/, pseudo/, predictions/, results.json")
    layout = None
    if data_root is None:
        results, _ = read_results(out_dir)
        data_root = (results or {}).get("data_root")
        if data_root is not None and not Path(str(data_root)).expanduser().exists() and (out_dir / str(data_root)).exists():
            data_root = out_dir / str(data_root)  # a root recorded relative to the output folder
    if data_root is not None:
        from wsss.data import resolve_data_root
        from wsss.data.voc import VOCLayout

        try:
            layout = VOCLayout(resolve_data_root(data_root))
        except DataError as exc:
            log.warning("images and GT masks will show as n/a: %s", exc)
    else:
        log.warning("no data root (pass --data-root, or record data_root in results.json): images and GT show as n/a")
    pred_root = out_dir / "predictions"
    if prediction_splits is None:
        dirs = sorted(p for p in pred_root.iterdir() if p.is_dir()) if pred_root.is_dir() else []
    else:
        dirs = [pred_root / s for s in prediction_splits]
    return RunFiles(out_dir, layout, dirs)


def _first_class_map(path: Path, key: str) -> tuple[np.ndarray, str]:
    """(map of the first class, its name) from one CAM file, read and validated by
    :func:`wsss.formats.cams.read_cams`; raises when it has no class."""
    cams, classes = read_cams(path, key)
    if not len(classes):
        raise KeyError("no classes")
    return cams[0].astype(np.float32), LABEL_NAMES[int(classes[0])]


def render_row(files: RunFiles, image_id: str, tile: int = DEFAULT_TILE) -> list[Image.Image]:
    """The :data:`COLUMNS` tiles of one image; a missing or unreadable input gives an ``n/a`` tile."""
    image = None
    image_path = files.source_path("image", image_id)
    if image_path is not None and image_path.is_file():
        try:
            image = read_image(image_path)
        except DataError as exc:
            log.warning("%s", exc)
    size = image.shape[:2] if image is not None else None

    tiles = []
    for title, source, key in COLUMNS:
        path = files.source_path(source, image_id)
        try:
            if source == "image":
                if image is None:
                    raise FileNotFoundError("no image")
                tiles.append(fit_tile(image, tile, image_id))
                continue
            if path is None or not path.is_file():
                raise FileNotFoundError("no data root" if source in ("gt", "image") and path is None else "missing")
            if key is not None:
                cam, name = _first_class_map(path, key)
                cam = _resize_to(cam, size, nearest=False) if size else cam
                tiles.append(fit_tile(cam_overlay(image, cam), tile, f"{title}: {name}"))
            else:
                label_map = read_label_png(path, check_values=False)
                label_map = _resize_to(label_map, size, nearest=True) if size else label_map
                names = present_classes(label_map)
                tiles.append(fit_tile(label_overlay(image, label_map), tile, ", ".join(names) or "background only"))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop a report
            if not isinstance(exc, FileNotFoundError):
                log.warning("%s: %s for %s: %s", image_id, title, path, exc)
            reason = exc.args[0] if isinstance(exc, (KeyError, FileNotFoundError)) and exc.args else type(exc).__name__
            tiles.append(na_tile(tile, str(reason)))
    return tiles


def compose(rows: Sequence[Sequence[Image.Image]], tile: int = DEFAULT_TILE) -> Image.Image:
    """Stack rows of tiles under a column-title header into one sheet of :func:`sheet_size`."""
    sheet = Image.new("RGB", sheet_size(len(rows), tile), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for col, (title, _, _) in enumerate(COLUMNS):
        x = MARGIN + col * (tile + MARGIN)
        text = _fit_text(draw, title, tile)
        draw.text((x + (tile - draw.textlength(text, font=_font())) / 2, 3), text, fill=(0, 0, 0), font=_font())
    for r, row in enumerate(rows):
        y = HEADER_HEIGHT + MARGIN + r * (tile + MARGIN)
        for col, picture in enumerate(row):
            sheet.paste(picture, (MARGIN + col * (tile + MARGIN), y))
    return sheet


def _save_png(picture: Image.Image, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        picture.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- HTML


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def html_value(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as key/value tables, lists of dicts as tables with one column per key."""
    if depth > 6:
        return html.escape(json.dumps(value)[:200])
    if isinstance(value, dict):
        if not value:
            return "<i>empty</i>"
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html_value(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f"<table>{body}</table>"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys: list[str] = []
            for row in value:
                keys += [k for k in row if k not in keys]
            head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
            body = "".join(
                "<tr>" + "".join(f"<td>{html_value(row[k], depth + 1) if k in row else ''}</td>" for k in keys) + "</tr>"
                for row in value
            )
            return f"<table><tr>{head}</tr>{body}</table>"
        if any(isinstance(v, (dict, list)) for v in value):
            return "<ol>" + "".join(f"<li>{html_value(v, depth + 1)}</li>" for v in value) + "</ol>"
        return ", ".join(_fmt(v) for v in value)
    if value is None:
        return "<i>none</i>"
    return _fmt(value)


_CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top;font-size:13px}
th{background:#eee}img{max-width:100%;border:1px solid #ccc;margin:.5em 0}"""


def render_index(title: str, meta: dict[str, Any], results: dict | None, results_problem: str | None,
                 sheet_names: Sequence[str]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", html_value(meta), "<h2>Results</h2>"]
    if results is None:
        parts.append(f"<p><i>{html.escape(results_problem or 'no results')}</i></p>")
    else:
        ordered = {k: results[k] for k in ("rows",) if k in results}
        ordered.update({k: v for k, v in results.items() if k != "rows"})
        if "rows" in ordered:
            parts.append(html_value(ordered.pop("rows")))
        if ordered:
            parts.append(html_value(ordered))
    parts.append("<h2>Per-image maps</h2>")
    parts.append("<p>Columns: " + ", ".join(html.escape(c[0]) for c in COLUMNS) + ". CAM tiles show the map of the "
                 "image's first image-level class (named on the tile) as a jet heatmap over the image; label tiles "
                 "show VOC colours and list the classes present; grey n/a tiles mark missing inputs.</p>")
    if not sheet_names:
        parts.append("<p><i>no images to show</i></p>")
    for name in sheet_names:
        parts.append(f"<p><a href='{html.escape(name)}'><img src='{html.escape(name)}' alt='{html.escape(name)}'></a></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- entry points


def _report_ids(files: RunFiles, split: str, max_images: int) -> list[str]:
    ids: list[str] = []
    if files.layout is not None:
        try:
            ids = files.layout.read_ids(split)
        except DataError as exc:
            log.warning("%s; showing the images that have CAM files instead", exc)
    if not ids:
        cam_dir = files.out_dir / "cams" / "layercam"
        # hidden files are never outputs (a killed writer's temporary file is .<id>.npz.<...>.tmp.npz)
        ids = sorted(p.stem for p in cam_dir.glob("*.npz") if not p.name.startswith(".")) if cam_dir.is_dir() else []
    return ids[:max_images]


def write_report(out_dir: str | Path, data_root: str | Path | None = None, split: str = "train",
                 max_images: int = 12, tile: int = DEFAULT_TILE, images_per_sheet: int = IMAGES_PER_SHEET) -> Path:
    """Write ``OUT/report/sheet_XX.png`` and ``OUT/report/index.html``; return the index path.

    ``data_root`` defaults to ``data_root`` in ``OUT/results.json``; predictions are read from
    ``OUT/predictions/<split>/``.
    """
    if max_images < 0 or tile < 16 or images_per_sheet < 1:
        raise ConfigError(f"need max_images >= 0, tile >= 16, images_per_sheet >= 1 (got {max_images}, {tile}, {images_per_sheet})")
    files = _open_run(out_dir, data_root, [split])
    report_dir = files.out_dir / "report"
    ids = _report_ids(files, split, max_images)
    names = []
    for start in range(0, len(ids), images_per_sheet):
        rows = [render_row(files, i, tile) for i in ids[start:start + images_per_sheet]]
        name = f"sheet_{start // images_per_sheet:02d}.png"
        _save_png(compose(rows, tile), report_dir / name)
        names.append(name)
    for stale in report_dir.glob("sheet_*.png") if report_dir.is_dir() else []:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    results, problem = read_results(files.out_dir)
    meta = {"output folder": str(files.out_dir), "data root": str(files.layout.root) if files.layout else "unknown",
            "split": split, "images shown": len(ids)}
    index = report_dir / "index.html"
    with atomic_path(index, ".html") as tmp:
        tmp.write_text(render_index(f"wsss report: {files.out_dir.name}", meta, results, problem, names), encoding="utf-8")
    return index


def show_image(image_id: str, out_dir: str | Path, data_root: str | Path | None = None, save: str | Path | None = None,
               tile: int = DEFAULT_TILE, split: str | None = None) -> Path:
    """Write the report row of one image as a PNG (default ``OUT/report/show_<id>.png``); return its path."""
    from wsss.data.voc import _ID_PATTERN

    if not _ID_PATTERN.match(image_id):
        raise DataError(f"not a plain image id: {image_id!r}")
    if tile < 16:
        raise ConfigError(f"--tile must be >= 16, got {tile}")
    files = _open_run(out_dir, data_root, None if split is None else [split])
    path = Path(save) if save is not None else files.out_dir / "report" / f"show_{image_id}.png"
    _save_png(compose([render_row(files, image_id, tile)], tile), path)
    return path


def main(argv: list[str]) -> int:
    """``wsss report``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss report",
        description="Contact sheets (image, GT, Grad-CAM, LayerCAM stages 3-5 and fused, pseudo-label, prediction "
        "per image) and an index.html with the results table, under OUT/report/.",
    )
    parser.add_argument("out", type=Path, help="pipeline output folder (written by `wsss run`)")
    parser.add_argument("--data-root", default=None, help="dataset root or `toy` (default: data_root in OUT/results.json)")
    parser.add_argument("--split", default="train", help="split whose first images are shown (default: train)")
    parser.add_argument("--max-images", type=int, default=12, help="images to show (default: 12)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side in pixels (default: {DEFAULT_TILE})")
    args = parser.parse_args(argv)
    index = write_report(args.out, args.data_root, split=args.split, max_images=args.max_images, tile=args.tile)
    print(index)
    return 0


def show_main(argv: list[str]) -> int:
    """``wsss show``: see ``--help``."""
    parser = argparse.ArgumentParser(prog="wsss show", description="One image's report row as a PNG.")
    parser.add_argument("id", help="image id")
    parser.add_argument("--out", required=True, type=Path, help="pipeline output folder (written by `wsss run`)")
    parser.add_argument("--data-root", default=None, help="dataset root or `toy` (default: data_root in OUT/results.json)")
    parser.add_argument("--split", default=None, help="read the prediction from OUT/predictions/SPLIT (default: any split)")
    parser.add_argument("--save", type=Path, default=None, help="PNG to write (default: OUT/report/show_<id>.png)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side in pixels (default: {DEFAULT_TILE})")
    args = parser.parse_args(argv)
    print(show_image(args.id, args.out, args.data_root, save=args.save, tile=args.tile, split=args.split))
    return 0
