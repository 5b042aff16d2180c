"""Paired image/mask transforms on torchvision ``transforms.v2``.

Images are ``tv_tensors.Image`` and masks ``tv_tensors.Mask``, so v2 resizes masks with nearest
neighbour, leaves them out of colour jitter and normalisation, and pads them with the value we
give per type: one pipeline keeps both aligned.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from wsss.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Crops pad the image with the mean colour, which normalises to 0 (as DeepLab pads).
MEAN_PIXEL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
PAD_FILL = {tv_tensors.Image: MEAN_PIXEL, tv_tensors.Mask: IGNORE_INDEX}


class RandomRescale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (relative to the input's own size)."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = float(torch.empty(()).uniform_(*self.scale_range))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # F.resize dispatches on type: bilinear for Image, nearest for Mask.
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class ResizeLongerSide(v2.Transform):
    """Resize so the longer side is ``size`` (the shorter side as torchvision's
    ``Resize(None, max_size=size)`` computes it), but never below 1 pixel: torchvision's own
    rounds the height of a 1 x 300 strip to 0 and fails inside its kernel."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short = max(1, int(self.size * min(height, width) / max(height, width)))
        return {"size": [self.size, short] if height >= width else [short, self.size]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class PadTo(v2.Transform):
    """Pad right and bottom up to ``size`` x ``size`` (image with the mean colour, mask with 255)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size - width), max(0, self.size - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else list(MEAN_PIXEL)
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def _finish() -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ]


def train_transform(
    crop_size: int,
    scale_range: tuple[float, float] = (0.7, 1.3),
    flip: bool = True,
    color_jitter: float = 0.3,
) -> v2.Compose:
    """Random rescale, crop to ``crop_size`` (image padded with the mean colour, mask with 255),
    horizontal flip, colour jitter (image only), ImageNet normalisation."""
    steps: list[v2.Transform] = [RandomRescale(scale_range), v2.RandomCrop(crop_size, pad_if_needed=True, fill=PAD_FILL)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 3)))
    return v2.Compose(steps + _finish())


def fit_transform(size: int) -> v2.Compose:
    """Deterministic: resize the longer side to ``size``, pad to ``size`` x ``size`` with the mean
    colour. For batched evaluation of the classifier on images of mixed sizes."""
    return v2.Compose([ResizeLongerSide(size), PadTo(size), *_finish()])


def eval_transform() -> v2.Compose:
    """Only normalisation: full-size images (CAMs, segmentation inference and validation)."""
    return v2.Compose(_finish())


def to_tv(image: np.ndarray, mask: np.ndarray | None = None) -> tuple:
    """Wrap an (H, W, 3) uint8 image (and optional (H, W) mask) as v2 tensors."""
    image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    if mask is None:
        return (image_t,)
    return image_t, tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
