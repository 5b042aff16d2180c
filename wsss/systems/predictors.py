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

from wsss.cams import FUSIONS, METHODS, cams_at_image_size, compute_cam_sets, resolve_layers, view_of
from wsss.classes import class_ids_of, label_values_of
from wsss.errors import ConfigError
from wsss.options import OptionError, check_choices, check_range, option
from wsss.crf import dense_crf
from wsss.segmentation import denormalize, image_probabilities


@dataclass(frozen=True)
class CamVariant:
    """One CAM output of a pass: ``method`` at ``layers``, fused by eq. 9 with ``scaled_layers``
    tanh-scaled; ``save_layers`` keeps each layer's normalised map in its file too. ``peak_quantile``
    and ``fusion``: what each layer's map is divided by and how layers combine
    (:func:`wsss.cams.cams_at_image_size`; the defaults are the paper's). Every value is checked here."""

    method: str = option("layercam", "CAM method", choices=METHODS)
    layers: tuple[str, ...] = option(("stage3", "stage4", "stage5"), "comma-separated layers (stage1..stage5 or module names)")
    scaled_layers: tuple[str, ...] = option(("stage3",), "comma-separated layers that get tanh(gamma*m) scaling ('' for none)", key="scaled")
    save_layers: bool = option(False, "also store each layer's normalised map, named after the layer")
    peak_quantile: float = option(1.0, "divide each layer's map by this quantile of its values instead of its maximum (1, the paper), "
                                  "clipped at 1; e.g. 0.99 (saved per-layer maps are normalised the same way)")
    fusion: str = option("max", "how the layers' maps combine: max (element-wise maximum, the paper) or mean (their average)", choices=FUSIONS)

    def __post_init__(self):
        check_choices(self)
        if not self.layers:
            raise OptionError("layers", "must name at least one layer")
        unknown = sorted(set(self.scaled_layers) - set(self.layers))
        if unknown:
            raise OptionError("scaled_layers", f"{unknown} are not among the CAM layers {list(self.layers)}")
        check_range("peak_quantile", self.peak_quantile, 0, 1, low_open=True)


class CamPredictor(pl.LightningModule):
    """Per image: the maps of its image-level classes for every :class:`CamVariant` (keyed by name),
    all from one forward and one backward per class slot (:func:`wsss.cams.compute_cam_sets`). Each
    variant's layer maps are summed over the views (``scales`` x ``flip``, made comparable by
    ``view_weighting``: see :func:`wsss.cams.accumulate_multiscale`) at the image size, then
    normalised and fused (LayerCAM eq. 9), by :func:`wsss.cams.cams_at_image_size`, which
    :class:`wsss.cams.CAM` uses too. Items: ``{"id", "classes" (K,) label values, "variants": {name: {"cams"
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
        for variant in variants.values():  # the variants checked their own values
            try:
                resolve_layers(classifier, variant.layers)  # fail now, with the valid names, not mid-run
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
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
        self.view_weighting = view_weighting

    def _view_maps(self, images: list[torch.Tensor], class_ids: list[list[int]], scale: float, flipped: bool) -> list[dict]:
        """Raw ``{method: {layer: maps}}`` of every image for one view; images of equal size share a batch."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            groups[tuple(image.shape[-2:])].append(index)
        out: list[dict] = [{} for _ in images]
        for members in groups.values():
            batch = view_of(torch.stack([images[i] for i in members]), scale, flipped, self.min_view_side)
            batch = batch.contiguous(memory_format=self.memory_format)
            try:
                maps = compute_cam_sets(self.classifier, batch, [class_ids[i] for i in members], self.requests)
            except ValueError as exc:  # a layer that cannot be explained (run twice, not (N, C, h, w), ...): the user's to fix
                raise ConfigError(str(exc)) from None
            for position, index in enumerate(members):
                out[index] = {method: {layer: layer_maps[position] for layer, layer_maps in by_layer.items()} for method, by_layer in maps.items()}
        return out

    def _variant(self, variant: CamVariant, views: list[dict], size: tuple[int, int]) -> dict[str, Any]:
        cams = cams_at_image_size([[view[variant.method][layer] for layer in variant.layers] for view in views], size,
                                  [layer in variant.scaled_layers for layer in variant.layers],
                                  flipped=[flipped for _, flipped in self.views], scales=[scale for scale, _ in self.views],
                                  view_weighting=self.view_weighting, gamma=self.gamma, peak_quantile=variant.peak_quantile,
                                  fusion=variant.fusion)
        layer_maps = {layer: maps.cpu().numpy().astype(np.float16) for layer, maps in zip(variant.layers, cams.layers)}
        # float32: the writer rounds to float16 for npz; IRN's and PSA's layouts keep float32.
        return {"cams": cams.fused.cpu().numpy(), "layers": layer_maps}

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        images = list(batch["image"]) if isinstance(batch["image"], list) else list(batch["image"].unbind(0))
        class_ids = [class_ids_of(multi_hot.cpu()) for multi_hot in batch["multi_hot"]]
        per_view = [self._view_maps(images, class_ids, scale, flipped) for scale, flipped in self.views]
        results = []
        for index, (image_id, size) in enumerate(zip(batch["id"], batch["size"])):
            size = tuple(int(s) for s in size)
            classes = label_values_of(class_ids[index])
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
