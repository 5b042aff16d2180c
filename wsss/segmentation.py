"""DeepLab inference on whole images: geometry and test-time augmentation. Tensor math only
(no Lightning, no files), shared by validation (:class:`wsss.systems.segmenter.SegmenterSystem`) and
prediction (:class:`wsss.systems.predictors.SegmenterPredictor`), so both give the same labels for
the same model.

Geometry: an image is padded (bottom/right, value 0 = the mean colour after normalisation) to the
next size 8k+1, where DeepLab's stride-8 logits (k+1 of them) sit exactly on pixels 0, 8, ..., 8k;
the logits are upsampled bilinearly with ``align_corners=True`` to the padded size and cropped
back to the image. Training crops are 321 = 8*40+1 for the same reason, and a loss on the logit
grid samples labels at the same positions (:func:`nearest_labels`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss.models.deeplab import OUTPUT_STRIDE



def aligned_size(size: int, stride: int = OUTPUT_STRIDE) -> int:
    """Smallest ``stride * k + 1 >= size`` (321 -> 321, 320 -> 321, 322 -> 329)."""
    return stride * math.ceil(max(size - 1, 0) / stride) + 1


def image_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Logits (N, C, H, W) at full resolution for normalised images (N, 3, H, W) of any size.

    Pads to 8k+1 (zeros = mean colour), runs the model, upsamples with ``align_corners=True``
    (logit j sits on pixel 8j), crops back. Returned in float32 even under bf16 autocast.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = aligned_size(height) - height, aligned_size(width) - width
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    logits = model(padded).float()
    logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=True)
    return logits[..., :height, :width]


def image_probabilities(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Softmax probabilities (C, H, W) of one normalised image (3, H, W), averaged over ``scales``
    and, with ``flip``, over horizontal flips (each pass is resized back to H x W first)."""
    height, width = image.shape[-2:]
    batch = image.unsqueeze(0)
    total: torch.Tensor | None = None
    passes = 0
    for scale in scales:
        scaled = batch
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        inputs = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        logits = image_logits(model, inputs)
        if scale != 1.0:
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        if flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        summed = probs.sum(dim=0)
        total = summed if total is None else total + summed
        passes += probs.shape[0]
    assert total is not None, "scales must not be empty"
    return total / passes


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) tensor back to the (H, W, 3) uint8 image it came from."""
    from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    pixels = ((image.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def nearest_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels (N, H, W) sampled with nearest neighbour at the ``size`` logit positions,
    with the same ``align_corners=True`` geometry as inference (321 -> 41 keeps every 8th pixel)."""
    rows = torch.linspace(0, masks.shape[-2] - 1, size[0], device=masks.device).round().long()
    cols = torch.linspace(0, masks.shape[-1] - 1, size[1], device=masks.device).round().long()
    return masks.index_select(-2, rows).index_select(-1, cols)
