"""Stage 2: class activation maps for every image's image-level classes (``wsss cams``).

One CAM file per image (:mod:`wsss.formats.cams`): ``OUT/<id>.npz`` with ``classes`` (int64 label
values 1..20) and ``cams`` (float16, (K, H, W) at the original image size, fused, in [0, 1]); with
``save_layers`` also one normalised, upsampled (K, H, W) float16 map per layer, stored under the
layer's name. With ``output_format="irn"`` or ``"psa"`` one ``OUT/<id>.npy`` per image instead,
in the layout of IRN's ``make_cam.py`` or of PSA's ``infer_cls.py``, which those methods' next
steps read as they read their own (:mod:`wsss.formats.irn`, :mod:`wsss.formats.psa`).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsss.cams import FUSIONS, METHODS, VIEW_WEIGHTINGS
from wsss.data import resolve_data_root
from wsss.data.datasets import ImageDataset, collate_list
from wsss.data.modules import PredictDataModule
from wsss.data.transforms import eval_transform
from wsss.data.voc import ImageLabels, VOCLayout
from wsss.errors import ConfigError
from wsss.formats.cams import SUFFIX_OF_FORMAT, cam_path, is_complete
from wsss.formats.images import image_size
from wsss.io import ensure_output_dir
from wsss.stages import options
from wsss.systems.checkpoints import load_classifier
from wsss.systems.predictors import CamPredictor, CamVariant
from wsss.systems.writers import CamWriter
from wsss.trainers import gather_objects, is_global_zero, parse_devices, predict_trainer

log = logging.getLogger(__name__)
OUTPUT_FORMATS = tuple(SUFFIX_OF_FORMAT)


@dataclass(frozen=True)
class CamCounts:
    """Images whose CAM file was written (by all processes together), and those already complete."""

    written: int
    skipped: int


def make_cams(
    checkpoint: str | Path,
    data_root: str | Path,
    outputs: Mapping[str | Path, CamVariant],
    *,
    split: str = "train_aug",
    labels: str = "auto",
    gamma: float = 2.0,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    view_weighting: str = "area",
    channels_last: bool = False,
    batch_size: int = 1,
    num_workers: int = 2,
    overwrite: bool = False,
    output_format: str = "npz",
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    progress: bool = True,
) -> dict[Path, CamCounts]:
    """Write, into each output folder, its :class:`CamVariant`'s CAM file of every image of
    ``split`` that lacks a complete one there (all of them with ``overwrite``).

    Every variant comes from the same passes: one forward per image (group) and one backward per
    class (:func:`wsss.cams.compute_cam_sets`), so LayerCAM at stages 3-5 with the Grad-CAM and
    Grad-CAM++ baselines costs what LayerCAM alone costs, and each file is byte for byte what a run
    of that variant alone writes.

    ``checkpoint``: a ``train-cls`` checkpoint. ``labels``: the image-level label source
    (:class:`~wsss.data.voc.ImageLabels`). Each variant's layers are fused (eq. 9) after each is
    summed over the views ``scales`` x (``flip``), made comparable by ``view_weighting``
    (:func:`wsss.cams.accumulate_multiscale`). ``channels_last``: NHWC memory format (faster
    convolutions on CPUs and recent GPUs; the maps agree to float rounding). ``output_format``:
    ``npz``, or ``irn``/``psa`` for IRN's/PSA's ``.npy`` layout (no ``save_layers``); a folder's
    files of another format are not counted as done.
    ``accelerator``/``devices``/``strategy`` go to the Trainer: under DDP each image is written by
    exactly one process, and the counts are everyone's.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown CAM output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format != "npz" and any(v.save_layers for v in outputs.values()):
        raise ConfigError(f"per-layer maps (--save-layers) are stored only in the npz format; the {output_format} layout has no place for them")
    folders = {Path(out_dir): variant for out_dir, variant in outputs.items()}
    layout = VOCLayout(resolve_data_root(data_root))
    image_labels = ImageLabels(layout, labels)
    ids = layout.read_ids(split)
    layout.check_images(ids)
    image_labels.check(ids)
    for out_dir in folders:
        ensure_output_dir(out_dir)
    # Variants are named after their folder in the predictor's items and the writer.
    predictor = CamPredictor(load_classifier(checkpoint), {str(d): v for d, v in folders.items()}, gamma, tuple(scales), flip,
                             view_weighting, channels_last)
    done = frozenset() if overwrite else frozenset(
        path for out_dir in folders for path in (cam_path(out_dir, i, output_format) for i in ids) if is_complete(path, output_format))
    todo = [i for i in ids if any(cam_path(out_dir, i, output_format) not in done for out_dir in folders)]
    skipped = {out_dir: sum(cam_path(out_dir, i, output_format) in done for i in ids) for out_dir in folders}
    for out_dir, variant in folders.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("CAMs (%s at %s) in %s: %d of %d images already done", variant.method, ",".join(variant.layers), out_dir, skipped[out_dir], len(ids))
    if not todo:
        return {out_dir: CamCounts(written=0, skipped=skipped[out_dir]) for out_dir in folders}
    # Only equal-sized images share a forward, and images with equal class counts share backwards:
    # batching images sorted by (class count, size) wastes no work.
    # Header reads only; an unreadable or too large image is refused here, before any work.
    todo = sorted(todo, key=lambda i: (int(image_labels(i).sum()), image_size(layout.image_path(i))))
    data = PredictDataModule(ImageDataset(layout, todo, eval_transform(), image_labels), batch_size, num_workers, collate_list)
    writer = CamWriter({str(d): d for d in folders}, {str(d): v.save_layers for d, v in folders.items()}, output_format, done)
    # CAMs need gradients; predict would otherwise run under inference_mode.
    trainer = predict_trainer(writer, accelerator, devices, strategy, progress, inference_mode=False)
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    written = gather_objects(trainer, writer.written)
    return {out_dir: CamCounts(written=sum(w[str(out_dir)] for w in written), skipped=skipped[out_dir]) for out_dir in folders}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsss cams", description="Stage 2: CAMs of every image's image-level classes, fused across layers.")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint from `wsss train-cls`")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, help="output folder for <id>.npz (<id>.npy with --format irn or psa)")
    parser.add_argument("--format", default="npz", choices=OUTPUT_FORMATS,
                        help="npz (default); irn: IRN's make_cam.py <id>.npy dict (keys, cam at stride 4, high_res) for IRN's "
                        "cam_to_ir_label.py and make_sem_seg_labels.py; psa: PSA's infer_cls.py <id>.npy dict "
                        "{class index: map} for PSA's infer_aff.py")
    parser.add_argument("--split", default="train_aug", help="split name or list file (default: train_aug)")
    parser.add_argument("--labels", default="auto", help="image-level labels: auto, annotations, masks, or a cls_labels.npy")
    parser.add_argument("--method", default="layercam", choices=METHODS)
    parser.add_argument("--layers", type=options.names, default="stage3,stage4,stage5", help="comma-separated layers (stage1..stage5 or module names)")
    parser.add_argument("--scaled", type=options.names, default="stage3", help="comma-separated layers that get tanh(gamma*m) scaling ('' for none)")
    parser.add_argument("--gamma", type=float, default=2.0, help="tanh scaling factor (paper: 2)")
    parser.add_argument("--fusion", default="max", choices=FUSIONS,
                        help="how the layers' maps combine: max (element-wise maximum, the paper) or mean (their average)")
    parser.add_argument("--peak-quantile", type=float, default=1.0,
                        help="divide each layer's map by this quantile of its values instead of its maximum (1, the paper), "
                        "clipped at 1; e.g. 0.99 (saved per-layer maps are normalised the same way)")
    parser.add_argument("--scales", type=options.scales, default="1.0", help="comma-separated input scales; 'irn' = 1.0,0.5,1.5,2.0")
    parser.add_argument("--flip", action="store_true", help="also use horizontally flipped inputs")
    parser.add_argument("--view-weighting", default="area", choices=VIEW_WEIGHTINGS,
                        help="how the views' maps are made comparable before they are summed: area (x scale^2, undoing the "
                        "pooled map's 1/(h*w); default), max (each view divided by its maximum), none (raw sum)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format: faster convolutions on CPUs and recent GPUs "
                        "(same maps up to float rounding)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (equal-sized images share it)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--save-layers", action="store_true", help="also store each layer's normalised map, named after the layer")
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    parser.add_argument("--devices", type=parse_devices, default="1", help="number of devices (DDP writes each image on exactly one rank)")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    variant = CamVariant(args.method, tuple(args.layers), tuple(args.scaled), args.save_layers, args.peak_quantile, args.fusion)
    counts = make_cams(
        args.checkpoint, args.data_root, {args.out: variant}, split=args.split, labels=args.labels, gamma=args.gamma,
        scales=args.scales, flip=args.flip, view_weighting=args.view_weighting, channels_last=args.channels_last, batch_size=args.batch_size, num_workers=args.num_workers, overwrite=args.overwrite,
        output_format=args.format, accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
    )[Path(args.out)]
    if is_global_zero():
        print(f"{counts.written} CAM files written, {counts.skipped} already complete, in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0
