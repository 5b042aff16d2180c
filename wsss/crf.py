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


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict[str, float] = CRF_PARAMS) -> np.ndarray:
    """Refine (C, H, W) probabilities with a fully connected CRF on the (H, W, 3) uint8 image.

    Unary: -log p. Pairwise: a Gaussian (smoothness) and a bilateral (appearance) kernel with
    DeepLab's parameters. Returns refined (C, H, W) float32 marginals. Needs ``pydensecrf``.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise ConfigError(f"--crf: {CRF_INSTALL_HINT}") from None
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
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
