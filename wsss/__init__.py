"""wsss: weakly-supervised semantic segmentation with LayerCAM."""
import os

__version__ = "0.1.0"


def limit_onednn_cache() -> None:
    """The `wsss` commands' own process setting, not an import side effect: oneDNN (PyTorch's CPU
    convolutions) keeps the primitives it builds for every input shape, about 13 MiB per shape for
    VGG16's forward and backward, so over VOC's many image sizes a pass over whole photos grew by
    hundreds of MiB per hundred photos. Without the cache it stops (CAM time unchanged, training
    steps ~3% slower; docs/benchmarks.md). It acts only before the first convolution of the
    process; a value already in the environment wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
