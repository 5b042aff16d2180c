"""Visual report of a pipeline run: ``wsss report OUT`` (contact sheets + index.html) and ``wsss show ID``.

Reads only files (the layout written by ``wsss run``, see the README) and draws with Pillow:

- one row per image: image, GT, Grad-CAM stage5, LayerCAM stage3/stage4/stage5, fused LayerCAM,
  pseudo-label, segmenter prediction (:data:`~wsss.report.draw.COLUMNS`; with the refined LayerCAM
  after the fused one when the run refined its CAMs);
- CAM tiles show the map of the image's **first** image-level class (``classes[0]`` of its npz) as a
  jet heatmap blended over the image, captioned ``"LayerCAM s3: cat"``;
- label tiles blend VOC colours over the image, captioned with the classes present;
- anything missing or unreadable becomes a grey ``n/a`` tile: a report never fails on one image.

Drawing is :mod:`wsss.report.draw` (whose constants fix the sheet geometry, see :func:`sheet_size`),
the HTML page :mod:`wsss.report.page`.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsss.classes import LABEL_NAMES
from wsss.errors import ConfigError, DataError
from wsss.formats.cams import list_cam_ids, read_cams
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png
from wsss.io import atomic_path
from wsss.report.draw import (
    DEFAULT_TILE, HEADER_HEIGHT, IMAGES_PER_SHEET, MARGIN, NUM_COLUMNS, REFINED_COLUMN, cam_overlay, columns_with_refined, compose,
    fit_tile, jet, label_overlay,
    na_tile, present_classes, resize_to, sheet_size,
)
from wsss.report.page import render_index

__all__ = ["DEFAULT_TILE", "HEADER_HEIGHT", "MARGIN", "NUM_COLUMNS", "RunFiles", "jet", "sheet_size", "show_image", "write_report"]
log = logging.getLogger(__name__)


@dataclass
class RunFiles:
    """Where one pipeline output folder keeps each input of a report row."""

    out_dir: Path
    layout: Any | None  # wsss.data.voc.DatasetLayout, or None when no data root is known
    prediction_dirs: list[Path]  # searched in order for <id>.png

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the dataset's label values (VOC's when no data root is known)."""
        return LABEL_NAMES if self.layout is None else self.layout.labels.names

    @property
    def columns(self) -> tuple[tuple[str, str, str | None], ...]:
        """The report's columns for this run: the refined maps beside the fused ones when it has them."""
        return columns_with_refined((self.out_dir / REFINED_COLUMN[1]).is_dir())

    def source_path(self, source: str, image_id: str) -> Path | None:
        if source == "image":
            return None if self.layout is None else self.layout.image_path(image_id)
        if source == "gt":
            return None if self.layout is None else self.layout.mask_path(image_id)
        if source == "prediction":
            return next((d / f"{image_id}.png" for d in self.prediction_dirs if (d / f"{image_id}.png").is_file()),
                        self.prediction_dirs[0] / f"{image_id}.png" if self.prediction_dirs else None)
        suffix = ".npz" if source.startswith("cams/") or source.endswith("/cams") else ".png"
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
        from wsss.data import open_layout

        try:
            layout = open_layout(data_root)
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


def _first_class_map(path: Path, key: str, names: Sequence[str] = LABEL_NAMES) -> tuple[np.ndarray, str]:
    """(map of the first class, its name in ``names``) from one CAM file, read and validated by
    :func:`wsss.formats.cams.read_cams`; raises when it has no class."""
    cams, classes = read_cams(path, key, num_classes=len(names) - 1)
    if not len(classes):
        raise KeyError("no classes")
    return cams[0].astype(np.float32), names[int(classes[0])]


def render_row(files: RunFiles, image_id: str, tile: int = DEFAULT_TILE) -> list[Image.Image]:
    """The tiles of one image, one per column of ``files.columns``; a missing or unreadable input
    gives an ``n/a`` tile."""
    image = None
    image_path = files.source_path("image", image_id)
    if image_path is not None and image_path.is_file():
        try:
            image = read_image(image_path)
        except DataError as exc:
            log.warning("%s", exc)
    size = image.shape[:2] if image is not None else None

    tiles = []
    for title, source, key in files.columns:
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
                cam, name = _first_class_map(path, key, files.label_names)
                cam = resize_to(cam, size, nearest=False) if size else cam
                tiles.append(fit_tile(cam_overlay(image, cam), tile, f"{title}: {name}"))
            else:
                label_map = read_label_png(path, check_values=False)
                label_map = resize_to(label_map, size, nearest=True) if size else label_map
                names = present_classes(label_map, files.label_names)
                tiles.append(fit_tile(label_overlay(image, label_map), tile, ", ".join(names) or "background only"))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop a report
            if not isinstance(exc, FileNotFoundError):
                log.warning("%s: %s for %s: %s", image_id, title, path, exc)
            reason = exc.args[0] if isinstance(exc, (KeyError, FileNotFoundError)) and exc.args else type(exc).__name__
            tiles.append(na_tile(tile, str(reason)))
    return tiles


def _save_png(picture: Image.Image, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        picture.save(tmp, format="PNG")


def _report_ids(files: RunFiles, split: str, max_images: int) -> list[str]:
    ids: list[str] = []
    if files.layout is not None:
        try:
            ids = files.layout.read_ids(split)
        except DataError as exc:
            log.warning("%s; showing the images that have CAM files instead", exc)
    if not ids:
        cam_dir = files.out_dir / "cams" / "layercam"
        ids = list_cam_ids(cam_dir) if cam_dir.is_dir() else []
    return ids[:max_images]


def write_report(out_dir: str | Path, data_root: str | Path | None = None, split: str | None = None,
                 max_images: int = 12, tile: int = DEFAULT_TILE, images_per_sheet: int = IMAGES_PER_SHEET) -> Path:
    """Write ``OUT/report/sheet_XX.png`` and ``OUT/report/index.html``; return the index path.

    ``data_root`` defaults to ``data_root`` in ``OUT/results.json``, ``split`` to its ``eval_split``
    (else ``train``); predictions are read from ``OUT/predictions/<split>/``.
    """
    if split is None:
        split = str((read_results(Path(out_dir).expanduser())[0] or {}).get("eval_split", "train"))
    if max_images < 0 or tile < 16 or images_per_sheet < 1:
        raise ConfigError(f"need max_images >= 0, tile >= 16, images_per_sheet >= 1 (got {max_images}, {tile}, {images_per_sheet})")
    files = _open_run(out_dir, data_root, [split])
    report_dir = files.out_dir / "report"
    ids = _report_ids(files, split, max_images)
    names = []
    for start in range(0, len(ids), images_per_sheet):
        rows = [render_row(files, i, tile) for i in ids[start:start + images_per_sheet]]
        name = f"sheet_{start // images_per_sheet:02d}.png"
        _save_png(compose(rows, tile, files.columns), report_dir / name)
        names.append(name)
    for stale in report_dir.glob("sheet_*.png") if report_dir.is_dir() else []:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    results, problem = read_results(files.out_dir)
    meta = {"output folder": str(files.out_dir), "data root": str(files.layout.root) if files.layout else "unknown",
            "split": split, "images shown": len(ids)}
    index = report_dir / "index.html"
    with atomic_path(index, ".html") as tmp:
        tmp.write_text(render_index(f"wsss report: {files.out_dir.name}", meta, results, problem, names, files.columns), encoding="utf-8")
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
    _save_png(compose([render_row(files, image_id, tile)], tile, files.columns), path)
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
    parser.add_argument("--split", default=None, help="split whose first images are shown (default: the run's eval_split in "
                        "OUT/results.json, else train)")
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
