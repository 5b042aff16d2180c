"""Stage 2: class activation maps for every image's image-level classes (``wsss cams``).

The classifier: a ``train-cls`` checkpoint (``--checkpoint``), or any torchvision classifier with
the user's weights (``--model torchvision:NAME --weights FILE``, a state dict of a 20-output head
whose output k is VOC class k + 1; the CAM layers are its module names).

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models import VisionTransformer

from wsss import limit_onednn_cache
from wsss.cams import VIEW_WEIGHTINGS
from wsss.data import open_layout
from wsss.data.datasets import ImageDataset, collate_list
from wsss.data.modules import PredictDataModule
from wsss.data.transforms import eval_transform
from wsss.data.voc import DatasetLayout, ImageLabels
from wsss.errors import ConfigError
from wsss.formats.cams import SUFFIX_OF_FORMAT, cam_files_in, cam_path, is_complete
from wsss.formats.images import image_size
from wsss.io import ensure_output_dir
from wsss.options import (add_options, check_choices, check_positive_list, check_range, option, options_from_args,
                          parse_stage_args, resource_values, result_params)
from wsss.options import scales as scales_option
from wsss.records import claim_folder, file_digest, module_digest
from wsss.systems.checkpoints import load_classifier, load_torchvision_classifier
from wsss.systems.predictors import CamPredictor, CamVariant
from wsss.systems.writers import CamWriter
from wsss.trainers import gather_objects, is_global_zero, parse_devices, predict_trainer

log = logging.getLogger(__name__)
OUTPUT_FORMATS = tuple(SUFFIX_OF_FORMAT)


@dataclass(frozen=True)
class CamOptions:
    """How a CAM pass runs, for every variant it writes: image-level label source, multi-scale views
    and tanh factor (these change the maps), and the resources (which never do)."""

    labels: str = option("auto", "image-level labels: auto, annotations, masks, or a cls_labels.npy")
    gamma: float = option(2.0, "tanh scaling factor of the scaled layers (paper: 2)")
    scales: tuple[float, ...] = option((1.0,), "comma-separated input scales; 'irn' = 1.0,0.5,1.5,2.0", parse=scales_option)
    flip: bool = option(False, "also use horizontally flipped inputs")
    view_weighting: str = option("area", "how the views' maps are made comparable before they are summed: area (x scale^2, undoing "
                                 "the pooled map's 1/(h*w)), max (each view divided by its maximum), none (raw sum)", choices=VIEW_WEIGHTINGS)
    channels_last: bool = option(False, "NHWC memory format: faster convolutions on CPUs and recent GPUs (maps equal to float16 "
                                 "rounding, tests/test_cams_stage.py)", neutral=True)
    batch_size: int = option(1, "images per forward pass (equal-sized images share it)", neutral=True)
    num_workers: int = option(2, "DataLoader workers", neutral=True)
    accelerator: str = option("auto", "cpu, gpu, auto", neutral=True)
    devices: int | str = option(1, "number of devices (DDP writes each image on exactly one rank)", neutral=True, parse=parse_devices)

    def __post_init__(self):
        check_choices(self)
        check_range("gamma", self.gamma, 0, low_open=True)
        check_positive_list("scales", self.scales)
        check_range("batch_size", self.batch_size, 1)
        check_range("num_workers", self.num_workers, 0)


@dataclass(frozen=True)
class CamCounts:
    """Images whose CAM file was written (by all processes together), and those already complete."""

    written: int
    skipped: int


def cam_record(variant: CamVariant, options: CamOptions, output_format: str, classifier: str, labels: str) -> dict[str, Any]:
    """What a CAM folder's record holds as its parameters and inputs (:mod:`wsss.records`)."""
    params = {**result_params(variant), **result_params(options), "format": output_format}
    params.pop("labels")
    return {"params": params, "inputs": {"classifier": classifier, "labels": labels}}


def make_cams(
    classifier: str | Path | nn.Module,
    data_root: str | Path,
    outputs: Mapping[str | Path, CamVariant],
    options: CamOptions = CamOptions(),
    *,
    split: str = "train_aug",
    overwrite: bool = False,
    output_format: str = "npz",
    strategy: str = "auto",
    progress: bool = True,
) -> dict[Path, CamCounts]:
    """Write, into each output folder, its :class:`CamVariant`'s CAM file of every image of
    ``split`` that lacks a complete one there (all of them with ``overwrite``).

    Every variant comes from the same passes: one forward per image (group) and one backward per
    class (:func:`wsss.cams.compute_cam_sets`), so LayerCAM at stages 3-5 with the Grad-CAM and
    Grad-CAM++ baselines costs what LayerCAM alone costs, and each file is byte for byte what a run
    of that variant alone writes.

    ``classifier``: a ``train-cls`` checkpoint, or a classifier module (e.g. from
    :func:`~wsss.systems.checkpoints.load_torchvision_classifier`) with 20 outputs, output k being
    VOC class k (label value k + 1) as for ours. ``options``: the label source, views and resources
    (:class:`CamOptions`). ``output_format``: ``npz``, or ``irn``/``psa`` for IRN's/PSA's ``.npy`` layout (no
    ``save_layers``). Each folder records its variant, options and inputs (:mod:`wsss.records`): a
    folder holding files made otherwise is refused unless ``overwrite``, which replaces them.
    ``strategy`` goes to the Trainer: under DDP each image is written by exactly one process, and
    the counts are everyone's.
    """
    limit_onednn_cache()
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown CAM output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format != "npz" and any(v.save_layers for v in outputs.values()):
        raise ConfigError(f"per-layer maps (--save-layers) are stored only in the npz format; the {output_format} layout has no place for them")
    folders = {Path(out_dir): variant for out_dir, variant in outputs.items()}
    layout = open_layout(data_root)
    image_labels = ImageLabels(layout, options.labels)
    ids = layout.read_ids(split)
    layout.check_images(ids)
    image_labels.check(ids)
    for out_dir in folders:
        ensure_output_dir(out_dir)
    if isinstance(classifier, nn.Module):
        model, classifier_identity, source = classifier, f"state_dict:{module_digest(classifier)}", type(classifier).__name__
    else:
        model, classifier_identity, source = load_classifier(classifier), f"sha256:{file_digest(classifier)}", Path(classifier).resolve()
    check_output_count(model, layout)
    for out_dir, variant in folders.items():
        claim_folder(out_dir, "cams", **cam_record(variant, options, output_format, classifier_identity, image_labels.identity()),
                     overwrite=overwrite, existing=cam_files_in(out_dir), what="CAM files", writer=is_global_zero(),
                     resources=resource_values(options),
                     sources={"classifier": source, "data_root": layout.root, "labels": image_labels.description})
    # Variants are named after their folder in the predictor's items and the writer.
    predictor = CamPredictor(model, {str(d): v for d, v in folders.items()}, options.gamma, options.scales, options.flip,
                             options.view_weighting, options.channels_last)
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
    data = PredictDataModule(ImageDataset(layout, todo, eval_transform(), image_labels), options.batch_size, options.num_workers, collate_list)
    writer = CamWriter({str(d): d for d in folders}, {str(d): v.save_layers for d, v in folders.items()}, output_format, done)
    # CAMs need gradients; predict would otherwise run under inference_mode.
    trainer = predict_trainer(writer, options.accelerator, options.devices, strategy, progress, inference_mode=False)
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    written = gather_objects(trainer, writer.written)
    return {out_dir: CamCounts(written=sum(w[str(out_dir)] for w in written), skipped=skipped[out_dir]) for out_dir in folders}


def check_output_count(model: nn.Module, layout: DatasetLayout) -> None:
    """ConfigError unless the classifier has one output per class of the dataset's label set (its
    final layer's rows: output k explains label value k + 1)."""
    heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    outputs = heads[-1].out_features if heads and isinstance(heads[-1], nn.Linear) else None
    if outputs is not None and outputs != layout.num_classes:
        raise ConfigError(f"the classifier has {outputs} outputs, but the dataset's label set {layout.labels.name!r} has "
                          f"{layout.num_classes} classes ({layout.root}): use a classifier trained on these classes")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsss cams", description="Stage 2: CAMs of every image's image-level classes, fused across layers.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="classifier checkpoint from `wsss train-cls`")
    source.add_argument("--model", help="torchvision:NAME (e.g. torchvision:resnet50), a torchvision classifier with --weights; "
                        "--layers are then its module names (e.g. layer3,layer4)")
    parser.add_argument("--weights", help="with --model: a state-dict file of that model with a 20-output head, output k "
                        "being class k+1 of the dataset (VOC: 0 aeroplane ... 19 tvmonitor); torch.save(model.state_dict(), FILE)")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, help="output folder for <id>.npz (<id>.npy with --format irn or psa)")
    parser.add_argument("--format", default="npz", choices=OUTPUT_FORMATS,
                        help="npz (default); irn: IRN's make_cam.py <id>.npy dict (keys, cam at stride 4, high_res) for IRN's "
                        "cam_to_ir_label.py and make_sem_seg_labels.py; psa: PSA's infer_cls.py <id>.npy dict "
                        "{class index: map} for PSA's infer_aff.py")
    parser.add_argument("--split", default="train_aug", help="split name or list file (default: train_aug)")
    add_options(parser, CamVariant)
    add_options(parser, CamOptions)
    parser.set_defaults(layers=None, scaled_layers=None)  # their defaults are our classifier's; a --model names its own
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist (and replace a folder made with other settings)")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp")
    args = parse_stage_args(parser, argv, CamVariant, CamOptions)
    start = time.perf_counter()
    if args.model is None:
        if args.weights is not None:
            raise ConfigError("--weights goes with --model torchvision:NAME; a train-cls checkpoint is given by --checkpoint alone")
        classifier: str | nn.Module = args.checkpoint
        layers = CamVariant.layers if args.layers is None else args.layers
        scaled = CamVariant.scaled_layers if args.scaled_layers is None else args.scaled_layers
    else:
        if args.weights is None:
            raise ConfigError(f"--model {args.model} needs --weights FILE, a state dict of that model (random weights explain nothing)")
        if not args.layers:
            raise ConfigError(f"--model {args.model} needs --layers: module names of the model, e.g. layer3,layer4 for a ResNet")
        names = open_layout(args.data_root).labels.names[1:]
        classifier = load_torchvision_classifier(
            args.model, args.weights, len(names),
            why=f"output k is explained as class k+1 of the dataset ({names[0]} = 0 ... {names[-1]} = {len(names) - 1}), so "
            f"the head must be one fine-tuned on its {len(names)} image-level labels in that order")
        if isinstance(classifier, VisionTransformer):  # its asserted input size would fail on the first image
            raise ConfigError(f"{args.model} takes only {classifier.image_size}x{classifier.image_size} images and outputs tokens: "
                              "use the Python API (wsss.cams.LayerCAM with reshape_transform=wsss.cams.tokens_to_nchw)")
        layers, scaled = args.layers, args.scaled_layers or ()
    variant = options_from_args(CamVariant, args, layers=tuple(layers), scaled_layers=tuple(scaled))
    counts = make_cams(classifier, args.data_root, {args.out: variant}, options_from_args(CamOptions, args), split=args.split,
                       overwrite=args.overwrite, output_format=args.format, strategy=args.strategy)[Path(args.out)]
    if is_global_zero():
        print(f"{counts.written} CAM files written, {counts.skipped} already complete, in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0
