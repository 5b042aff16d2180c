"""Predict-only LightningModules: each ``predict_step`` returns one dict per image, which a writer
of :mod:`wsss.systems.writers` turns into that image's file."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from wsss.cams import FUSIONS, METHODS, VIEW_WEIGHTINGS, accumulate_multiscale, compute_cam_sets, fuse_cams, normalize_maps, resolve_layers
from wsss.classes import class_ids_of
from wsss.errors import ConfigError
from wsss.crf import dense_crf
from wsss.segmentation import denormalize, image_probabilities


@dataclass(frozen=True)
class CamVariant:
    """One CAM output of a pass: ``method`` at ``layers``, fused by eq. 9 with ``scaled_layers``
    tanh-scaled; ``save_layers`` keeps each layer's normalised map in its file too. ``peak_quantile``
    and ``fusion``: what each layer's map is divided by and how layers combine
    (:func:`wsss.cams.fuse_cams`; the defaults are the paper's)."""

    method: str = "layercam"
    layers: tuple[str, ...] = ("stage3", "stage4", "stage5")
    scaled_layers: tuple[str, ...] = ("stage3",)
    save_layers: bool = False
    peak_quantile: float = 1.0
    fusion: str = "max"


class CamPredictor(pl.LightningModule):
    """Per image: the maps of its image-level classes for every :class:`CamVariant` (keyed by name),
    all from one forward and one backward per class slot (:func:`wsss.cams.compute_cam_sets`). Each
    variant's layer maps are summed over the views (``scales`` x ``flip``, made comparable by
    ``view_weighting``: see :func:`wsss.cams.accumulate_multiscale`) at the image size, then
    fused (LayerCAM eq. 9). Items: ``{"id", "classes" (K,) label values, "variants": {name: {"cams"
    (K, H, W) float32 fused, "layers": {layer: (K, H, W) float16 normalised}}}}``.

    ``channels_last``: the classifier and its inputs in NHWC memory format (same maps to float
    rounding; 0.86x the time on this project's 2-core CPU, docs/benchmarks.md).

    Run with ``inference_mode=False``: CAMs need gradients (``compute_cam_sets`` enables them inside).
    """

    def __init__(self, classifier: torch.nn.Module, variants: Mapping[str, CamVariant], gamma: float = 2.0,
                 scales: Sequence[float] = (1.0,), flip: bool = False, view_weighting: str = "area", channels_last: bool = False):
        super().__init__()
        if not variants:
            raise ConfigError("no CAM variants requested")
        for variant in variants.values():
            if variant.method not in METHODS:
                raise ConfigError(f"unknown CAM method {variant.method!r}; choose one of {', '.join(METHODS)}")
            try:
                resolve_layers(classifier, variant.layers)  # fail now, with the valid names, not mid-run
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            unknown = sorted(set(variant.scaled_layers) - set(variant.layers))
            if unknown:
                raise ConfigError(f"scaled layers {unknown} are not among the CAM layers {list(variant.layers)}")
            if variant.fusion not in FUSIONS:
                raise ConfigError(f"unknown CAM fusion {variant.fusion!r}; choose one of {', '.join(FUSIONS)}")
            if not 0 < variant.peak_quantile <= 1:
                raise ConfigError(f"the peak quantile must be in (0, 1], got {variant.peak_quantile!r}")
        self.classifier = classifier.eval()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.classifier.to(memory_format=torch.channels_last)
        # Views smaller than this leave no position at the deepest layer (VGG16: 16 px, four
        # 2x2 pools); they are enlarged to it, and their maps resized to the image like any view's.
        self.min_view_side = int(getattr(classifier, "min_input_side", 1))
        self.variants, self.gamma = dict(variants), gamma
        self.requests: dict[str, list[str]] = {}  # method -> every layer any variant wants it at
        for variant in self.variants.values():
            layers = self.requests.setdefault(variant.method, [])
            layers += [layer for layer in variant.layers if layer not in layers]
        self.views = [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]
        if view_weighting not in VIEW_WEIGHTINGS:
            raise ConfigError(f"unknown view weighting {view_weighting!r}; choose one of {', '.join(VIEW_WEIGHTINGS)}")
        self.view_weighting = view_weighting

    def _view_maps(self, images: list[torch.Tensor], class_ids: list[list[int]], scale: float, flipped: bool) -> list[dict]:
        """Raw ``{method: {layer: maps}}`` of every image for one view; images of equal size share a batch."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            groups[tuple(image.shape[-2:])].append(index)
        out: list[dict] = [{} for _ in images]
        for (height, width), members in groups.items():
            batch = torch.stack([images[i] for i in members])
            size = (max(self.min_view_side, round(height * scale)), max(self.min_view_side, round(width * scale)))
            if size != (height, width):
                batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
            if flipped:
                batch = batch.flip(-1)
            batch = batch.contiguous(memory_format=self.memory_format)
            maps = compute_cam_sets(self.classifier, batch, [class_ids[i] for i in members], self.requests)
            for position, index in enumerate(members):
                out[index] = {method: {layer: layer_maps[position] for layer, layer_maps in by_layer.items()} for method, by_layer in maps.items()}
        return out

    def _variant(self, variant: CamVariant, views: list[dict], size: tuple[int, int]) -> dict[str, Any]:
        summed = accumulate_multiscale([[view[variant.method][layer] for layer in variant.layers] for view in views],
                                       [flipped for _, flipped in self.views], size, [scale for scale, _ in self.views], self.view_weighting)
        # Each layer normalised once, for its saved map and for the fusion: a normalised map's maximum
        # is exactly 1 (or it is all 0), so fuse_cams' own division by the maximum leaves it bit for
        # bit as it is, and the quantile (two kthvalue passes per layer) is not computed twice.
        normalized = [normalize_maps(maps, peak_quantile=variant.peak_quantile) for maps in summed]
        fused = fuse_cams(normalized, size, [layer in variant.scaled_layers for layer in variant.layers], self.gamma,
                          fusion=variant.fusion)
        layer_maps = {layer: maps.cpu().numpy().astype(np.float16) for layer, maps in zip(variant.layers, normalized)}
        # float32: the writer rounds to float16 for npz; IRN's and PSA's layouts keep float32.
        return {"cams": fused.cpu().numpy(), "layers": layer_maps}

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
                variants = {name: {"cams": np.zeros((0, *size), np.float32), "layers": {layer: empty for layer in v.layers}}
                            for name, v in self.variants.items()}
            else:
                views = [view[index] for view in per_view]
                variants = {name: self._variant(variant, views, size) for name, variant in self.variants.items()}
            results.append({"id": image_id, "classes": classes, "variants": variants})
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
