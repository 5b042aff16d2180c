"""Prediction writers: each image's file is written as soon as its batch is done (never kept in
memory, ``return_predictions=False``), atomically, by the process that predicted it."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import BasePredictionWriter

from wsss.formats.cams import cam_path, write_cam_file
from wsss.formats.label_png import write_label_png


class PerImageWriter(BasePredictionWriter):
    """Writes every item of a ``predict_step``'s list into ``out_dir``; ``written`` counts this
    process's files."""

    def __init__(self, out_dir: str | Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for item in prediction:
            self.write_item(item)

    def write_item(self, item: dict[str, Any]) -> None:
        raise NotImplementedError


class CamWriter(PerImageWriter):
    """:class:`~wsss.systems.predictors.CamPredictor` items -> one file per variant and image:
    ``out_dirs[name]/<id>.npz`` (with per-layer maps where ``save_layers[name]``) or IRN's or PSA's
    ``<id>.npy`` (``output_format="irn"``/``"psa"``). Files in ``done`` (complete before the run) are not
    rewritten; ``written`` counts this process's files."""

    def __init__(self, out_dirs: Mapping[str, Path], save_layers: Mapping[str, bool], output_format: str = "npz",
                 done: frozenset[Path] = frozenset()):
        super().__init__(next(iter(out_dirs.values())))
        self.out_dirs, self.save_layers, self.output_format, self.done = dict(out_dirs), dict(save_layers), output_format, done
        self.written: dict[str, int] = dict.fromkeys(out_dirs, 0)  # per variant

    def write_item(self, item: dict[str, Any]) -> None:
        for name, maps in item["variants"].items():
            path = cam_path(self.out_dirs[name], item["id"], self.output_format)
            if path in self.done:
                continue
            write_cam_file(path, self.output_format, item["classes"], maps["cams"], maps["layers"] if self.save_layers[name] else None)
            self.written[name] += 1


class LabelPNGWriter(PerImageWriter):
    """``{"id", "label_map"}`` items -> ``<id>.png``, a VOC-palette PNG or, with ``png_mode="gray"``,
    an 8-bit grayscale one (:func:`~wsss.formats.label_png.write_label_png`)."""

    def __init__(self, out_dir: str | Path, png_mode: str = "palette"):
        super().__init__(out_dir)
        self.png_mode = png_mode

    def write_item(self, item: dict[str, Any]) -> None:
        write_label_png(self.out_dir / f"{item['id']}.png", item["label_map"], self.png_mode)
        self.written += 1


class PseudoLabelWriter(LabelPNGWriter):
    """Items with a ``status``: ``labelled`` ones are written, ``skipped`` (a valid PNG is already
    there) and ``failed`` (its ``message`` says why) ones are counted."""

    def __init__(self, out_dir: str | Path, png_mode: str = "palette"):
        super().__init__(out_dir, png_mode)
        self.skipped = 0
        self.failed: dict[str, str] = {}

    def write_item(self, item: dict[str, Any]) -> None:
        if item["status"] == "labelled":
            super().write_item(item)
        elif item["status"] == "skipped":
            self.skipped += 1
        else:
            self.failed[item["id"]] = item["message"]
