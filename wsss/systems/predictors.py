"""Predict-only LightningModules: each ``predict_step`` returns one dict per image, which a writer
of :mod:`wsss.systems.writers` turns into that image's file."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from wsss.cams import METHODS, accumulate_multiscale, compute_cams, fuse_cams, normalize_maps, resolve_layers
from wsss.classes import class_ids_of
from wsss.errors import ConfigError
from wsss.segmentation import dense_crf, denormalize, image_probabilities


class CamPredictor(pl.LightningModule):
    """Per image: maps of its image-level classes at ``layers`` over every view (``scales`` x
    ``flip``), summed per layer at the image size, then fused (LayerCAM eq. 9), ``scaled_layers``
    tanh-scaled. Items: ``{"id", "classes" (K,) label values, "cams" (K, H, W) float32 fused,
    "layers": {layer: (K, H, W) float16 normalised}}``.

    Run with ``inference_mode=False``: LayerCAM needs gradients (:func:`wsss.cams.compute_cams`
    enables them inside).
    """

    def __init__(self, classifier: torch.nn.Module, layers: Sequence[str], scaled_layers: Sequence[str] = (), method: str = "layercam",
                 gamma: float = 2.0, scales: Sequence[float] = (1.0,), flip: bool = False):
        super().__init__()
        try:
            resolve_layers(classifier, layers)  # fail now, with the valid names, not mid-run
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        unknown = sorted(set(scaled_layers) - set(layers))
        if unknown:
            raise ConfigError(f"scaled layers {unknown} are not among the CAM layers {list(layers)}")
        if method not in METHODS:
            raise ConfigError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
        self.classifier = classifier.eval()
        # Views smaller than this leave no position at the deepest layer (VGG16: 16 px, four
        # 2x2 pools); they are enlarged to it, and their maps resized to the image like any view's.
        self.min_view_side = int(getattr(classifier, "min_input_side", 1))
        self.layers, self.method, self.gamma = list(layers), method, gamma
        self.tanh_scaled = [layer in scaled_layers for layer in self.layers]
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
        class_ids = [class_ids_of(multi_hot.cpu()) for multi_hot in batch["multi_hot"]]
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
            fused = fuse_cams(summed, size, self.tanh_scaled, self.gamma)
            layer_maps = {layer: normalize_maps(maps).cpu().numpy().astype(np.float16) for layer, maps in zip(self.layers, summed)}
            # float32: the writer rounds to float16 for npz; IRN's layout keeps float32.
            results.append({"id": image_id, "classes": classes, "cams": fused.cpu().numpy(), "layers": layer_maps})
        return results


class SegmenterPredictor(pl.LightningModule):
    """Label maps of whole images: softmax averaged over ``scales`` and ``flip``, optional dense CRF,
    argmax. Items: ``{"id", "label_map" (H, W) uint8}``."""

    def __init__(self, model: torch.nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False, crf: bool = False, channels_last: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.scales, self.flip, self.crf, self.channels_last = tuple(scales), flip, crf, channels_last

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=torch.channels_last) if self.channels_last else images)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        results = []
        for image_id, image in zip(batch["id"], batch["image"]):
            probs = image_probabilities(self._forward, image, self.scales, self.flip)
            if self.crf:
                probs = torch.from_numpy(dense_crf(denormalize(image), probs.cpu().numpy()))
            results.append({"id": image_id, "label_map": probs.argmax(0).to(torch.uint8).cpu().numpy()})
        return results


class PassThroughPredictor(pl.LightningModule):
    """Parameter-free predict module for stages whose dataset already did the per-item work
    (``pseudo-labels``: the work is NumPy in DataLoader workers)."""

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        return batch
