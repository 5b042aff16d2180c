"""Stage 2: class activation maps for every image's image-level classes (``wsss cams``).

One ``OUT/<id>.npz`` per image: ``classes`` (int64 label values 1..20) and ``cams`` (float16,
(K, H, W) at the original image size, fused, in [0, 1]); with ``save_layers`` also one
normalised, upsampled (K, H, W) float16 map per layer, stored under the layer's name.

With ``output_format="irn"`` one ``OUT/<id>.npy`` per image instead, in IRN's ``make_cam.py``
layout so that IRN's later steps read it unchanged: a pickled dict with ``keys`` (int64 0-based
class indices, label value - 1) and ``high_res`` (float32 fused maps, as above).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter

from wsss.cams import METHODS, accumulate_multiscale, compute_cams, fuse_cams, normalize_maps, resolve_layers
from wsss.data import resolve_data_root
from wsss.data.datasets import ImageDataset, collate_list, labels_to_class_ids
from wsss.data.modules import PredictDataModule
from wsss.data.transforms import eval_transform
from wsss.data.voc import ImageLabels, VOCLayout
from wsss.errors import ConfigError
from wsss.io import ensure_output_dir, image_info, is_valid_npy_dict, is_valid_npz, write_irn_cams, write_npz
from wsss.lightning import gather_objects, is_global_zero, parse_devices, predict_trainer

log = logging.getLogger(__name__)
CAM_KEYS = ("classes", "cams")
IRN_KEYS = ("keys", "high_res")
OUTPUT_FORMATS = ("npz", "irn")
IRN_SCALES = (1.0, 0.5, 1.5, 2.0)


class CamSystem(pl.LightningModule):
    """Predict-only module: per image, maps of its classes at ``layers`` over all scales/flips,
    summed per layer at the image size, then fused (LayerCAM eq. 9)."""

    def __init__(self, classifier: torch.nn.Module, layers: list[str], scaled: list[bool], method: str = "layercam", gamma: float = 2.0, scales: tuple[float, ...] = (1.0,), flip: bool = False):
        super().__init__()
        try:
            resolve_layers(classifier, layers)  # fail now, with the valid names, not mid-run
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if method not in METHODS:
            raise ConfigError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
        self.classifier = classifier.eval()
        # Views smaller than this leave no position at the deepest layer (VGG16: 16 px, four
        # 2x2 pools); they are enlarged to it, and their maps resized to the image like any view's.
        self.min_view_side = int(getattr(classifier, "min_input_side", 1))
        self.layers, self.scaled, self.method, self.gamma = list(layers), list(scaled), method, gamma
        self.views = [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]

    def _view_maps(self, images: list[torch.Tensor], class_ids: list[list[int]], scale: float, flipped: bool) -> list[list[torch.Tensor]]:
        """Raw per-layer maps of every image for one view; images of equal size share a batch."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            groups[tuple(image.shape[-2:])].append(index)
        out: list[list[torch.Tensor]] = [[] for _ in images]
        for (height, width), members in groups.items():
            batch = torch.stack([images[i] for i in members])
            size = (max(self.min_view_side, round(height * scale)), max(self.min_view_side, round(width * scale)))
            if size != (height, width):
                batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
            if flipped:
                batch = batch.flip(-1)
            maps = compute_cams(self.classifier, batch, [class_ids[i] for i in members], self.layers, self.method)
            for position, index in enumerate(members):
                out[index] = [maps[layer][position] for layer in self.layers]
        return out

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        images = list(batch["image"]) if isinstance(batch["image"], list) else list(batch["image"].unbind(0))
        class_ids = [labels_to_class_ids(labels.cpu()) for labels in batch["labels"]]
        per_view = [self._view_maps(images, class_ids, scale, flipped) for scale, flipped in self.views]
        results = []
        for index, (image_id, size) in enumerate(zip(batch["id"], batch["size"])):
            size = tuple(int(s) for s in size)
            classes = np.asarray(class_ids[index], dtype=np.int64) + 1
            if not len(classes):  # no image-level class: nothing to explain, K = 0
                empty = np.zeros((0, *size), dtype=np.float16)
                results.append({"id": image_id, "classes": classes, "cams": np.zeros((0, *size), np.float32), "layers": {layer: empty for layer in self.layers}})
                continue
            summed = accumulate_multiscale([view[index] for view in per_view], [flipped for _, flipped in self.views], size)
            fused = fuse_cams(summed, size, self.scaled, self.gamma)
            layer_maps = {layer: normalize_maps(maps).cpu().numpy().astype(np.float16) for layer, maps in zip(self.layers, summed)}
            # float32: the writer rounds to float16 for npz; IRN's layout keeps float32.
            results.append({"id": image_id, "classes": classes, "cams": fused.cpu().numpy(), "layers": layer_maps})
        return results


class CamWriter(BasePredictionWriter):
    """Writes each image's maps as soon as its batch is done (``<id>.npz``, or ``<id>.npy`` in IRN's
    layout): atomic, never kept in memory. ``written`` counts this process's files."""

    def __init__(self, out_dir: Path, save_layers: bool, output_format: str = "npz"):
        super().__init__(write_interval="batch")
        self.out_dir, self.save_layers, self.output_format = out_dir, save_layers, output_format
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for item in prediction:
            if self.output_format == "irn":
                write_irn_cams(self.out_dir / f"{item['id']}.npy", item["classes"] - 1, item["cams"])
            else:
                arrays = {"classes": item["classes"], "cams": item["cams"].astype(np.float16)}
                if self.save_layers:
                    arrays.update(item["layers"])
                write_npz(self.out_dir / f"{item['id']}.npz", **arrays)
            self.written += 1


def pending_ids(ids: list[str], out_dir: Path, overwrite: bool, output_format: str = "npz") -> list[str]:
    """Ids whose output in ``output_format`` is missing or incomplete (everything with ``overwrite``)."""
    if overwrite:
        return ids
    if output_format == "irn":
        return [i for i in ids if not is_valid_npy_dict(out_dir / f"{i}.npy", IRN_KEYS)]
    return [i for i in ids if not is_valid_npz(out_dir / f"{i}.npz", CAM_KEYS)]


def run_cams(
    checkpoint: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    split: str = "train_aug",
    labels: str = "auto",
    method: str = "layercam",
    layers: tuple[str, ...] = ("stage3", "stage4", "stage5"),
    scaled_layers: tuple[str, ...] = ("stage3",),
    gamma: float = 2.0,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    batch_size: int = 1,
    num_workers: int = 2,
    save_layers: bool = False,
    overwrite: bool = False,
    output_format: str = "npz",
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    progress: bool = True,
) -> dict[str, int]:
    """Write CAMs for ``split`` into ``out_dir`` (``output_format``: ``npz``, or ``irn`` for IRN's
    ``.npy`` layout); returns counts of written (by all processes together) and skipped images."""
    from wsss.stages.classify import load_classifier

    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown CAM output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if save_layers and output_format != "npz":
        raise ConfigError("per-layer maps (--save-layers) are stored only in the npz format; IRN's layout has no place for them")
    unknown = set(scaled_layers) - set(layers)
    if unknown:
        raise ConfigError(f"scaled layers {sorted(unknown)} are not among the CAM layers {list(layers)}")
    out_dir = Path(out_dir)
    layout = VOCLayout(resolve_data_root(data_root))
    image_labels = ImageLabels(layout, labels)
    ids = layout.read_ids(split)
    layout.check_images(ids)
    image_labels.check(ids)
    ensure_output_dir(out_dir)
    system = CamSystem(load_classifier(checkpoint), list(layers), [layer in scaled_layers for layer in layers], method, gamma, tuple(scales), flip)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_ids(ids, out_dir, overwrite, output_format)
    log.info("CAMs (%s at %s) for %d of %d images in %s; %d already done", method, ",".join(layers), len(todo), len(ids), out_dir, len(ids) - len(todo))
    if not todo:
        return {"written": 0, "skipped": len(ids)}
    # Each backward serves one class slot of the whole batch, and only equal-sized images share
    # a forward: batching images with the same class count and size wastes no work.
    # Header reads only; an unreadable or too large image is refused here, before any work.
    todo.sort(key=lambda i: (int(image_labels(i).sum()), image_info(layout.image_path(i))[:2]))
    data = PredictDataModule(ImageDataset(layout, todo, eval_transform(), image_labels), batch_size, num_workers, collate_list)
    writer = CamWriter(out_dir, save_layers, output_format)
    # CAMs need gradients; predict would otherwise run under inference_mode.
    trainer = predict_trainer(writer, accelerator, devices, strategy, progress, inference_mode=False)
    trainer.predict(system, datamodule=data, return_predictions=False)
    return {"written": sum(gather_objects(trainer, writer.written)), "skipped": len(ids) - len(todo)}


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsss cams", description="Stage 2: CAMs of every image's image-level classes, fused across layers.")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint from `wsss train-cls`")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, help="output folder for <id>.npz (<id>.npy with --format irn)")
    parser.add_argument("--format", default="npz", choices=OUTPUT_FORMATS,
                        help="npz (default), or irn: IRN's make_cam.py <id>.npy dict (keys, high_res) that IRN's later steps read unchanged")
    parser.add_argument("--split", default="train_aug", help="split name or list file (default: train_aug)")
    parser.add_argument("--labels", default="auto", help="image-level labels: auto, annotations, masks, or a cls_labels.npy")
    parser.add_argument("--method", default="layercam", choices=METHODS)
    parser.add_argument("--layers", default="stage3,stage4,stage5", help="comma-separated layers (stage1..stage5 or module names)")
    parser.add_argument("--scaled", default="stage3", help="comma-separated layers that get tanh(gamma*m) scaling ('' for none)")
    parser.add_argument("--gamma", type=float, default=2.0, help="tanh scaling factor (paper: 2)")
    parser.add_argument("--scales", default="1.0", help="comma-separated input scales; 'irn' = 1.0,0.5,1.5,2.0")
    parser.add_argument("--flip", action="store_true", help="also use horizontally flipped inputs")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (equal-sized images share it)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--save-layers", action="store_true", help="also store each layer's normalised map, named after the layer")
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    parser.add_argument("--devices", default="1", help="number of devices (DDP writes each image on exactly one rank)")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp")
    args = parser.parse_args(argv)
    scales = IRN_SCALES if args.scales == "irn" else tuple(float(s) for s in _names(args.scales))
    devices = parse_devices(args.devices)
    start = time.perf_counter()
    counts = run_cams(
        args.checkpoint, args.data_root, args.out, args.split, args.labels, args.method, _names(args.layers), _names(args.scaled),
        args.gamma, scales, args.flip, args.batch_size, args.num_workers, args.save_layers, args.overwrite,
        args.format, args.accelerator, devices, args.strategy,
    )
    if not is_global_zero():
        return 0
    print(f"{counts['written']} CAM files written, {counts['skipped']} already complete, in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0
