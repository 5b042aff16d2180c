"""Confident seeds for affinity training, by IRN's and PSA's rules (pure NumPy; the dense CRF is
:mod:`wsss.crf`). A seed map holds 0 (confident background), a class value (confident
foreground) or 255 (unknown, no pair label). Both references run two dense CRFs on the image, a
strict one whose foreground is trusted and a lenient one whose background is trusted:

- IRN (``step/cam_to_ir_label.py``): label CRFs of argmax([``fg_threshold``, CAMs]) and of
  argmax([``bg_threshold``, CAMs]) (0.30 and 0.05); a class where the first gives it, background
  where both give background, 255 elsewhere.
- PSA (``infer_cls.py``, ``voc12/data.py``): score CRFs of [(1 - max CAM)^4, CAMs] and
  [(1 - max CAM)^32, CAMs]; the first's argmax, 255 where it is background, then 0 wherever the
  second's is background.
"""
from __future__ import annotations

import numpy as np

from wsss.classes import IGNORE_INDEX

SEED_RULES = ("irn", "psa")
PSA_ALPHAS = (4.0, 32.0)  # PSA's low_alpha and high_alpha


def combine_irn(strict: np.ndarray, lenient: np.ndarray) -> np.ndarray:
    """IRN's combination of two label maps (0 = background): ``strict``'s classes, 0 where both
    are 0, 255 elsewhere."""
    seeds = np.where(strict == 0, IGNORE_INDEX, strict)
    seeds[(strict == 0) & (lenient == 0)] = 0
    return seeds.astype(np.uint8)


def combine_psa(strict: np.ndarray, lenient: np.ndarray) -> np.ndarray:
    """PSA's combination: ``strict``'s classes, 255 where it is 0, then 0 wherever ``lenient`` is 0
    (that last step wins even over ``strict``'s classes)."""
    seeds = np.where(strict == 0, IGNORE_INDEX, strict)
    seeds[lenient == 0] = 0
    return seeds.astype(np.uint8)


def with_background(cams: np.ndarray, background: np.ndarray | float) -> np.ndarray:
    """(K+1, H, W) float32: ``background`` (a map or one value) stacked before the (K, H, W) maps."""
    return np.concatenate([np.broadcast_to(np.float32(background), (1, *cams.shape[1:])), cams.astype(np.float32)])


def crf_seeds(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, rule: str = "irn",
              bg_threshold: float = 0.05, fg_threshold: float = 0.30, alphas: tuple[float, float] = PSA_ALPHAS) -> np.ndarray:
    """(H, W) uint8 seeds of one image ((H, W, 3) uint8) from its CAMs (K, H, W) in [0, 1] of label
    values ``classes`` (K,), by ``rule`` (module docstring). Needs ``pydensecrf``."""
    from wsss.crf import CAM_CRF_PARAMS, dense_crf, dense_crf_labels

    if rule not in SEED_RULES:
        raise ValueError(f"seed rule {rule!r} unknown; choose from {', '.join(SEED_RULES)}")
    values = np.concatenate([[0], np.asarray(classes, dtype=np.int64)])
    if len(classes) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    if rule == "irn":
        strict, lenient = (values[dense_crf_labels(image, with_background(cams, t).argmax(axis=0), len(values))]
                           for t in (fg_threshold, bg_threshold))
        return combine_irn(strict, lenient)
    background = 1 - cams.max(axis=0)
    strict, lenient = (values[dense_crf(image, with_background(cams, background ** alpha), CAM_CRF_PARAMS).argmax(axis=0)]
                       for alpha in alphas)
    return combine_psa(strict, lenient)
