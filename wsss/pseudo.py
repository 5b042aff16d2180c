"""Pseudo-labels from fused CAMs: superpixel voting (paper eq. 10) and the field's CAM seed rule.

Pure NumPy (plus scikit-image's SLIC); no file I/O.

Inputs shared by every function:

- ``cams``: (K, H, W) floating array in [0, 1] (float16/32/64), one fused map per image-level class.
- ``classes``: the K label values of those maps, each in 1..20, distinct, in the same order.

Outputs are (H, W) uint8 label maps: 0 background, else the class value.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from skimage.segmentation import slic

from wsss.classes import IGNORE_INDEX

# SLIC parameters used when ``superpixel_labels`` gets no precomputed segments. The paper does not
# give them; chosen by scripts/sweep_slic.py (docs/slic_sweep.md): on the toy split the best
# superpixels hold ~250-370 px with compactness 30-40 (stride-8-like blurry CAMs). Area, not
# count, is what transfers across image sizes, so n_segments=600 gives ~310 px superpixels on a
# 375x500 VOC image. Re-run the sweep with real CAMs (--cams) when they exist.
SLIC_DEFAULTS: dict[str, Any] = {
    "n_segments": 600,
    "compactness": 30.0,
    "sigma": 1.0,
    "start_label": 0,
}

# eq. 10's background threshold on the mean CAM score of a superpixel.
DEFAULT_THRESHOLD = 0.3


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an (H, W, 3) array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")


MAX_CLASS_VALUE = 254  # uint8 label maps: 0 background, 255 ignored


def _check_cams(cams: np.ndarray, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate ``cams`` and ``classes``; return ``classes`` as a uint8 array."""
    if not isinstance(cams, np.ndarray) or cams.ndim != 3:
        raise ValueError(f"cams must be a (K, H, W) array, got shape {getattr(cams, 'shape', None)}")
    if cams.dtype.kind != "f":
        raise ValueError(f"cams must be floating point, got dtype {cams.dtype}")
    if cams.size:
        if not np.isfinite(cams).all():
            raise ValueError("cams contain NaN or Inf")
        low, high = float(cams.min()), float(cams.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"cams must lie in [0, 1], found values in [{low:g}, {high:g}]")
    class_values = np.asarray(classes)
    if class_values.ndim != 1:
        raise ValueError(f"classes must be a 1-D sequence of label values, got shape {class_values.shape}")
    if len(class_values) != cams.shape[0]:
        raise ValueError(f"got {len(class_values)} classes for {cams.shape[0]} CAMs")
    if class_values.size:
        if class_values.dtype.kind not in "iu":
            raise ValueError(f"classes must be integers, got dtype {class_values.dtype}")
        # The math is any dataset's (VOC's 1..20, COCO's 1..80): the CAM file readers check the
        # dataset's range; here only what a uint8 label map can hold besides 0 and the ignore 255.
        if class_values.min() < 1 or class_values.max() > MAX_CLASS_VALUE:
            raise ValueError(f"class values must be in 1..{MAX_CLASS_VALUE}, got {class_values.tolist()}")
        if len(np.unique(class_values)) != len(class_values):
            raise ValueError(f"classes must be distinct, got {class_values.tolist()}")
    return class_values.astype(np.uint8)


def slic_segments(image: np.ndarray, **slic_kwargs: Any) -> np.ndarray:
    """SLIC superpixels of an (H, W, 3) uint8 RGB image: (H, W) integer segment ids.

    Uses :data:`SLIC_DEFAULTS` updated by ``slic_kwargs`` (any ``skimage.segmentation.slic``
    keyword). This is the only place SLIC is called.
    """
    _check_image(image)
    params = {**SLIC_DEFAULTS, **slic_kwargs}
    return slic(image, channel_axis=-1, **params)


def _contiguous_segments(segments: np.ndarray) -> tuple[np.ndarray, int]:
    """Flat non-negative segment indices usable as bincount bins, and the number of bins."""
    flat = segments.reshape(-1)
    low, high = int(flat.min()), int(flat.max())
    if low >= 0 and high < 4 * flat.size + 1024:
        # Common case (SLIC ids 0..n-1): use the ids as bins directly; unused bins just stay
        # empty. Avoids the sort in np.unique.
        return flat, high + 1
    # Negative or huge ids: relabel to 0..n-1.
    uniques, inverse = np.unique(flat, return_inverse=True)
    return inverse.reshape(-1), len(uniques)


def superpixel_labels(
    image: np.ndarray,
    cams: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    segments: np.ndarray | None = None,
    ignore_below: float | None = None,
    background: np.ndarray | None = None,
    **slic_kwargs: Any,
) -> np.ndarray:
    """Pseudo-label map by superpixel voting (paper eq. 10).

    For each superpixel O and class c: S_c = mean of ``cams[c]`` over the pixels of O. O takes the
    class with the largest S_c, or background (0) if that largest S_c < ``threshold`` (a score
    exactly equal to the threshold is foreground). Ties between classes go to the class listed
    first in ``classes``. With K = 0 every pixel is background. Means are taken in float64.

    With ``ignore_below`` (> ``threshold``), a superpixel whose largest S_c lies in
    [``threshold``, ``ignore_below``) is neither: it gets 255, which the segmenter's loss ignores
    (as IRN and PSA leave their uncertain seed pixels unlabelled). None (the paper) labels every pixel.

    With ``background`` (an (H, W) map in [0, 1], e.g. the background marginal of
    :func:`crf_scores`), a superpixel is background when its mean background score exceeds its best
    class mean, instead of comparing that mean with the constant ``threshold``.

    Args:
        image: (H, W, 3) uint8 RGB image (only its shape is used when ``segments`` is given).
        cams: (K, H, W) float maps in [0, 1].
        classes: the K label values (1..20) of the maps.
        threshold: background threshold on the superpixel mean.
        segments: optional precomputed (H, W) integer superpixel ids (any integers); otherwise
            :func:`slic_segments` is run with ``slic_kwargs``.
        ignore_below: upper end of the uncertain band (see above), or None.
        background: per-pixel background score competing with the classes (see above), or None.

    Returns:
        (H, W) uint8 label map with values in {0} ∪ ``classes`` (∪ {255} with ``ignore_below``).
    """
    _check_image(image)
    class_values = _check_cams(cams, classes)
    height, width = image.shape[:2]
    if cams.shape[1:] != (height, width):
        raise ValueError(f"cams have spatial shape {cams.shape[1:]}, image has {(height, width)}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if ignore_below is not None and not (np.isfinite(ignore_below) and ignore_below > threshold):
        raise ValueError(f"ignore_below must be a finite number above threshold {threshold}, got {ignore_below}")
    if background is not None:
        if ignore_below is not None:
            raise ValueError("ignore_below works on the constant threshold; it cannot be combined with a background map")
        if background.shape != (height, width) or not np.isfinite(background).all():
            raise ValueError(f"background must be a finite (H, W) = {(height, width)} map, got shape {background.shape}")
    if segments is None:
        if len(class_values) == 0:
            return np.zeros((height, width), dtype=np.uint8)  # no class to vote for: skip SLIC
        segments = slic_segments(image, **slic_kwargs)
    elif slic_kwargs:
        raise ValueError(f"SLIC options {sorted(slic_kwargs)} given together with precomputed segments")
    segments = np.asarray(segments)
    if segments.shape != (height, width):
        raise ValueError(f"segments have shape {segments.shape}, image has {(height, width)}")
    if segments.dtype.kind not in "iu":
        raise ValueError(f"segments must hold integer ids, got dtype {segments.dtype}")

    if len(class_values) == 0:
        return np.zeros((height, width), dtype=np.uint8)

    seg, num_bins = _contiguous_segments(segments)
    counts = np.bincount(seg, minlength=num_bins)
    # (K, num_bins) per-superpixel sums: one weighted bincount per class (K is small).
    sums = np.stack(
        [np.bincount(seg, weights=cam.reshape(-1), minlength=num_bins) for cam in cams]
    )
    means = sums / np.maximum(counts, 1)  # empty bins (unused ids) are never looked up
    best = means.argmax(axis=0)  # argmax returns the first maximum: earlier class wins ties
    best_score = means[best, np.arange(num_bins)]
    if background is not None:
        threshold = np.bincount(seg, weights=background.reshape(-1), minlength=num_bins) / np.maximum(counts, 1)
    lut = np.where(best_score < threshold, 0, class_values[best]).astype(np.uint8)
    if ignore_below is not None:
        lut[(best_score >= threshold) & (best_score < ignore_below)] = IGNORE_INDEX
    return lut[seg].reshape(height, width)


def cam_best_class(
    cams: np.ndarray, classes: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel best class score and label, computed once for a background-threshold sweep.

    Returns:
        ``(best_score, best_label)``: (H, W) maximum over the K maps, in ``cams``' dtype (0 if
        K = 0), and
        (H, W) uint8 class value of that maximum (first class in ``classes`` on ties; 0 if K = 0).
        Pass them to :func:`seed_labels_from_best` for each threshold.
    """
    class_values = _check_cams(cams, classes)
    height, width = cams.shape[1:]
    if len(class_values) == 0:
        return np.zeros((height, width), cams.dtype), np.zeros((height, width), np.uint8)
    best = cams.argmax(axis=0)
    best_score = np.take_along_axis(cams, best[None], axis=0)[0]
    return best_score, class_values[best]


def seed_labels_from_best(
    best_score: np.ndarray, best_label: np.ndarray, bg_threshold: float
) -> np.ndarray:
    """CAM seed label map from :func:`cam_best_class`: the class where its score > ``bg_threshold``.

    Equivalent to argmax over [background = bg_threshold, class maps] with background listed
    first, so a score equal to the threshold is background (the field's convention; note it is
    the opposite tie rule from eq. 10's superpixel threshold).
    """
    if best_score.shape != best_label.shape:
        raise ValueError(f"best_score {best_score.shape} and best_label {best_label.shape} differ in shape")
    if not np.isfinite(bg_threshold):
        raise ValueError(f"bg_threshold must be finite, got {bg_threshold}")
    # Compare in float64: a bare Python float would be rounded to float16 maps' precision first.
    return np.where(best_score > np.float64(bg_threshold), best_label, 0).astype(np.uint8)


def cam_seed_labels(
    cams: np.ndarray, classes: Sequence[int] | np.ndarray, bg_threshold: float
) -> np.ndarray:
    """The field's CAM seed rule: per-pixel argmax over [bg_threshold, cams[0], ..., cams[K-1]].

    Returns an (H, W) uint8 map: 0 where no class map exceeds ``bg_threshold`` (ties go to
    background), else the value in ``classes`` of the largest map (first listed on ties).
    For many thresholds, call :func:`cam_best_class` once and :func:`seed_labels_from_best` per
    threshold.
    """
    best_score, best_label = cam_best_class(cams, classes)
    return seed_labels_from_best(best_score, best_label, bg_threshold)


def crf_scores(image: np.ndarray, cams: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
               params: dict[str, float] | None = None) -> np.ndarray:
    """Refine CAM scores with a dense CRF on the image: (K+1, H, W) marginals, background first.

    The unary probabilities are the scores [``threshold`` everywhere, ``cams[0]``, ...], clipped
    at 1e-5 and normalised per pixel; so before any refinement, a pixel's argmax is eq. 10's rule
    (background unless a class scores above ``threshold``). Feed ``[1:]`` and ``background=[0]`` to
    :func:`superpixel_labels`. Needs ``pydensecrf`` (the ``crf`` extra).
    """
    from wsss.crf import CAM_CRF_PARAMS, dense_crf

    _check_image(image)
    _check_cams(cams, np.arange(1, len(cams) + 1))
    if cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams have spatial shape {cams.shape[1:]}, image has {image.shape[:2]}")
    scores = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams.astype(np.float32)])
    probs = np.maximum(scores, 1e-5)
    return dense_crf(image, probs / probs.sum(axis=0, keepdims=True), params or CAM_CRF_PARAMS)
