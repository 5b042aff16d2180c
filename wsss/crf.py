"""Dense CRF (Krähenbühl & Koltun 2011) on an image's class probabilities: the refinement the
field applies to segmenter outputs (DeepLab) and to CAM scores (PSA, IRN). NumPy in and out; needs
the optional ``pydensecrf`` (``pip install 'wsss[crf]'``)."""
from __future__ import annotations

import numpy as np

from wsss.errors import ConfigError

CRF_INSTALL_HINT = "dense CRF needs pydensecrf: pip install 'wsss[crf]' (or pip install pydensecrf2)"
# DeepLab-LargeFOV's cross-validated dense-CRF parameters on VOC (Chen et al. 2015):
# bilateral w=4, theta_xy=121, theta_rgb=5; Gaussian w=3, theta_xy=3; 10 mean-field iterations.
CRF_PARAMS = {"bi_w": 4.0, "bi_xy": 121.0, "bi_rgb": 5.0, "pos_w": 3.0, "pos_xy": 3.0, "iterations": 10}


# PSA's crf_inference for CAM scores: a wider, more colour-tolerant appearance kernel than
# DeepLab's (the scores are coarse blobs, not a segmenter's sharp output).
CAM_CRF_PARAMS = {"bi_w": 10.0, "bi_xy": 80.0, "bi_rgb": 13.0, "pos_w": 3.0, "pos_xy": 3.0, "iterations": 10}
# IRN's cam_to_ir_label.py (misc/imutils.crf_inference_label): a label map as unary with 70%
# confidence, Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10, 10 iterations.
IRN_LABEL_CRF_PARAMS = {"bi_w": 10.0, "bi_xy": 50.0, "bi_rgb": 5.0, "pos_w": 3.0, "pos_xy": 3.0, "iterations": 10, "gt_prob": 0.7}


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    except ImportError:
        raise ConfigError(f"--crf: {CRF_INSTALL_HINT}") from None
    return dcrf, utils


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict[str, float] = CRF_PARAMS) -> np.ndarray:
    """Refine (C, H, W) probabilities with a fully connected CRF on the (H, W, 3) uint8 image.

    Unary: -log p (p clipped at 1e-5; not renormalised, as PSA feeds its raw scores). Pairwise: a
    Gaussian (smoothness) and a bilateral (appearance) kernel with ``params`` (default DeepLab's).
    Returns refined (C, H, W) float32 marginals. Needs ``pydensecrf``.
    """
    dcrf, utils = _densecrf()
    return _inference(dcrf, image, utils.unary_from_softmax(probs.astype(np.float32)), probs.shape[0], params)


def dense_crf_labels(image: np.ndarray, labels: np.ndarray, num_labels: int, params: dict[str, float] = IRN_LABEL_CRF_PARAMS) -> np.ndarray:
    """IRN's label CRF: an (H, W) map of labels 0..num_labels-1 as unary (each pixel its label with
    probability ``gt_prob``, the rest shared evenly), refined by mean field on the (H, W, 3) uint8
    image; returns the (H, W) argmax of the marginals. Needs ``pydensecrf``."""
    dcrf, utils = _densecrf()
    unary = utils.unary_from_labels(labels.astype(np.int64), num_labels, params["gt_prob"], zero_unsure=False)
    return _inference(dcrf, image, unary, num_labels, params).argmax(axis=0)


def _inference(dcrf, image: np.ndarray, unary: np.ndarray, classes: int, params: dict[str, float]) -> np.ndarray:
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params["pos_xy"], compat=params["pos_w"])
    crf.addPairwiseBilateral(sxy=params["bi_xy"], srgb=params["bi_rgb"], rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=params["bi_w"])
    marginals = crf.inference(int(params["iterations"]))
    return np.asarray(marginals, dtype=np.float32).reshape(classes, height, width)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True
