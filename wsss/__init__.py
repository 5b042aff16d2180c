"""wsss: weakly-supervised semantic segmentation with LayerCAM."""

__version__ = "0.1.0"
