"""Stage 4, prediction: label PNGs of whole images from a trained segmenter (``wsss predict-seg``).

The geometry is the validation's (:mod:`wsss.segmentation`), so at scale 1 without flip the
evaluator scores these PNGs exactly as ``train-seg`` scored its validation.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from wsss import limit_onednn_cache
from wsss.crf import CRF_INSTALL_HINT, crf_available
from wsss.data import open_layout
from wsss.data.datasets import ImageDataset, collate_list
from wsss.data.modules import PredictDataModule
from wsss.data.transforms import eval_transform
from wsss.errors import ConfigError
from wsss.formats.label_png import PNG_MODE_HELP, PNG_MODES, label_pngs_in, missing_label_pngs
from wsss.io import ensure_output_dir
from wsss.options import (add_options, check_choices, check_positive_list, check_range, option, options_from_args,
                          parse_stage_args, resource_values, result_params)
from wsss.options import scales as scales_option
from wsss.records import claim_folder, file_digest
from wsss.systems.checkpoints import load_segmenter
from wsss.systems.predictors import SegmenterPredictor
from wsss.systems.writers import LabelPNGWriter
from wsss.trainers import gather_objects, is_global_zero, parse_devices, predict_trainer


@dataclass(frozen=True)
class PredictOptions:
    """Test-time views and refinement of the segmenter's probabilities (these change the labels),
    and the resources (which never do). Every value is checked here."""

    scales: tuple[float, ...] = option((1.0,), "comma-separated test scales, e.g. 0.75,1,1.25", parse=scales_option)
    flip: bool = option(False, "also average horizontally flipped passes")
    crf: bool = option(False, f"refine with a dense CRF ({CRF_INSTALL_HINT})")
    bf16: bool = option(False, "bf16 autocast (Trainer precision bf16-mixed); probabilities stay float32")
    png_mode: str = option("palette", PNG_MODE_HELP, choices=PNG_MODES)
    channels_last: bool = option(False, "NHWC memory format (same labels to float rounding)", neutral=True)
    batch_size: int = option(1, "images per predict step (each is processed at its own size)", neutral=True)
    num_workers: int = option(2, "DataLoader worker processes", neutral=True)
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu, ...", neutral=True)
    devices: int | str = option("auto", "Lightning devices: auto, 1, 4, '0,1' (several = DDP, each image on one rank)", neutral=True,
                                parse=parse_devices)

    def __post_init__(self):
        check_choices(self)
        check_positive_list("scales", self.scales)
        check_range("batch_size", self.batch_size, 1)
        check_range("num_workers", self.num_workers, 0)


@dataclass(frozen=True)
class PredictionCounts:
    """Images of the split, label PNGs written (by all processes together), PNGs already there."""

    images: int
    written: int
    skipped: int


def predict_segmentation(
    checkpoint: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    options: PredictOptions = PredictOptions(),
    *,
    split: str = "val",
    overwrite: bool = False,
    progress: bool = True,
) -> PredictionCounts:
    """Write ``out_dir/<id>.png`` for every image of ``split`` that has none (all with ``overwrite``),
    in ``png_mode`` (``palette``: VOC palette; ``gray``: 8-bit grayscale); an existing PNG of the
    other mode counts as none.

    ``checkpoint``: a ``train-seg`` checkpoint. ``options.scales``/``flip`` average softmax
    probabilities, ``crf`` refines them with DeepLab's dense CRF (needs pydensecrf), ``bf16``:
    bf16 autocast, probabilities stay float32. Under DDP (``devices`` > 1) each image is done by
    one process. The folder records the checkpoint and options (:mod:`wsss.records`): PNGs made
    by another checkpoint or with other options are refused unless ``overwrite``.
    """
    limit_onednn_cache()
    if options.crf and not crf_available():
        raise ConfigError(f"--crf: {CRF_INSTALL_HINT}")
    model = load_segmenter(checkpoint)
    layout = open_layout(data_root)
    ids = layout.read_ids(split)
    out_dir = ensure_output_dir(out_dir)
    claim_folder(out_dir, "predict-seg", result_params(options), {"segmenter": f"sha256:{file_digest(checkpoint)}"}, overwrite=overwrite,
                 existing=label_pngs_in(out_dir), what="label PNGs", writer=is_global_zero(),
                 resources=resource_values(options),
                 sources={"checkpoint": Path(checkpoint).resolve(), "data_root": layout.root})
    todo = ids if overwrite else missing_label_pngs(out_dir, ids, options.png_mode)
    if not todo:
        return PredictionCounts(len(ids), 0, len(ids))
    layout.check_images(todo)
    data = PredictDataModule(ImageDataset(layout, todo, eval_transform()), options.batch_size, options.num_workers, collate_list)
    writer = LabelPNGWriter(out_dir, options.png_mode)
    trainer = predict_trainer(writer, options.accelerator, options.devices, progress=progress,
                              precision="bf16-mixed" if options.bf16 else "32-true")
    trainer.predict(SegmenterPredictor(model, options.scales, options.flip, options.crf, options.channels_last), datamodule=data,
                    return_predictions=False)
    return PredictionCounts(len(ids), sum(gather_objects(trainer, writer.written)), len(ids) - len(todo))


def main(argv: list[str]) -> int:
    """``wsss predict-seg``: label PNGs for every image of a split."""
    parser = argparse.ArgumentParser(prog="wsss predict-seg", description="Predict label PNGs with a trained segmenter.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `wsss train-seg` (best.ckpt / last.ckpt)")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, help="output folder for <id>.png")
    parser.add_argument("--split", default="val", help="split name under ImageSets/Segmentation, or a list file (default: val)")
    add_options(parser, PredictOptions)
    parser.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist (and replace a folder made otherwise)")
    args = parse_stage_args(parser, argv, PredictOptions)
    counts = predict_segmentation(args.checkpoint, args.data_root, args.out, options_from_args(PredictOptions, args), split=args.split,
                                  overwrite=args.overwrite)
    if is_global_zero():
        print(f"predict-seg: {counts.images} images in '{args.split}': {counts.written} label PNGs written, "
              f"{counts.skipped} already in {args.out} (skipped)")
    return 0
