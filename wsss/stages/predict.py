"""Stage 4, prediction: label PNGs of whole images from a trained segmenter (``wsss predict-seg``).

The geometry is the validation's (:mod:`wsss.segmentation`), so at scale 1 without flip the
evaluator scores these PNGs exactly as ``train-seg`` scored its validation.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wsss.data import resolve_data_root
from wsss.data.datasets import ImageDataset, collate_list
from wsss.data.modules import PredictDataModule
from wsss.data.transforms import eval_transform
from wsss.data.voc import VOCLayout
from wsss.errors import ConfigError
from wsss.formats.label_png import PNG_MODES, check_png_mode, missing_label_pngs
from wsss.io import ensure_output_dir
from wsss.crf import CRF_INSTALL_HINT, crf_available
from wsss.stages import options
from wsss.systems.checkpoints import load_segmenter
from wsss.systems.predictors import SegmenterPredictor
from wsss.systems.writers import LabelPNGWriter
from wsss.trainers import gather_objects, is_global_zero, parse_devices, predict_trainer


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
    *,
    split: str = "val",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: bool = False,
    overwrite: bool = False,
    batch_size: int = 1,
    num_workers: int = 2,
    accelerator: str = "auto",
    devices: int | str = "auto",
    bf16: bool = False,
    channels_last: bool = False,
    png_mode: str = "palette",
    progress: bool = True,
) -> PredictionCounts:
    """Write ``out_dir/<id>.png`` for every image of ``split`` that has none (all with ``overwrite``),
    in ``png_mode`` (``palette``: VOC palette; ``gray``: 8-bit grayscale); an existing PNG of the
    other mode counts as none.

    ``checkpoint``: a ``train-seg`` checkpoint. ``scales``/``flip`` average softmax probabilities,
    ``crf`` refines them with DeepLab's dense CRF (needs pydensecrf). ``bf16``: bf16 autocast,
    probabilities stay float32. Under DDP (``devices`` > 1) each image is done by one process.
    """
    if crf and not crf_available():
        raise ConfigError(f"--crf: {CRF_INSTALL_HINT}")
    options.check_at_least("--batch-size", batch_size, 1)
    check_png_mode(png_mode)
    model = load_segmenter(checkpoint)
    layout = VOCLayout(resolve_data_root(data_root))
    ids = layout.read_ids(split)
    out_dir = ensure_output_dir(out_dir)
    todo = ids if overwrite or not out_dir.is_dir() else missing_label_pngs(out_dir, ids, png_mode)
    if not todo:
        return PredictionCounts(len(ids), 0, len(ids))
    layout.check_images(todo)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = PredictDataModule(ImageDataset(layout, todo, eval_transform()), batch_size, num_workers, collate_list)
    writer = LabelPNGWriter(out_dir, png_mode)
    trainer = predict_trainer(writer, accelerator, devices, progress=progress, precision="bf16-mixed" if bf16 else "32-true")
    trainer.predict(SegmenterPredictor(model, scales, flip, crf, channels_last), datamodule=data, return_predictions=False)
    return PredictionCounts(len(ids), sum(gather_objects(trainer, writer.written)), len(ids) - len(todo))


def main(argv: list[str]) -> int:
    """``wsss predict-seg``: label PNGs for every image of a split."""
    parser = argparse.ArgumentParser(prog="wsss predict-seg", description="Predict label PNGs with a trained segmenter.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `wsss train-seg` (best.ckpt / last.ckpt)")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, help="output folder for <id>.png")
    parser.add_argument("--split", default="val", help="split name under ImageSets/Segmentation, or a list file (default: val)")
    parser.add_argument("--scales", type=options.scales, default=(1.0,), help="comma-separated test scales, e.g. 0.75,1,1.25 (default: 1.0)")
    parser.add_argument("--flip", action="store_true", help="also average horizontally flipped passes")
    parser.add_argument("--crf", action="store_true", help=f"refine with a dense CRF ({CRF_INSTALL_HINT})")
    parser.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist (default: skip them)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per predict step (each is processed at its own size)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--devices", type=parse_devices, default="auto", help="Lightning devices: auto, 1, 4, '0,1' (several = DDP, each image on one rank)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer precision bf16-mixed); probabilities stay float32")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPUs)")
    parser.add_argument("--png-mode", default="palette", choices=PNG_MODES,
                        help="palette: VOC-palette PNGs (default, VOC's format; PIL reads the indices); gray: 8-bit grayscale "
                        "PNGs of the same indices, for readers that decode a palette to colours (imageio, cv2). An existing "
                        "PNG of the other mode is redone")
    args = parser.parse_args(argv)
    counts = predict_segmentation(
        args.checkpoint, args.data_root, args.out, split=args.split, scales=args.scales, flip=args.flip, crf=args.crf,
        overwrite=args.overwrite, batch_size=args.batch_size, num_workers=args.num_workers, accelerator=args.accelerator,
        devices=args.devices, bf16=args.bf16, channels_last=args.channels_last, png_mode=args.png_mode,
    )
    if is_global_zero():
        print(f"predict-seg: {counts.images} images in '{args.split}': {counts.written} label PNGs written, "
              f"{counts.skipped} already in {args.out} (skipped)")
    return 0
