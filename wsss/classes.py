"""PASCAL VOC class names and colours, defined once for the whole package.

Words used throughout: ``class_ids`` are 0-based indices into the 20 classes (the classifier's
logits); ``classes`` are label values 1..20 (as in masks and CAM files); a ``multi_hot`` is the
(20,) image-level vector; a ``label_map`` is an (H, W) uint8 map of label values (0 background,
255 ignored).
"""
from __future__ import annotations

import numpy as np

# The 20 foreground classes in VOC order; mask value = index + 1.
CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = len(CLASS_NAMES)  # classifier outputs
# Segmentation labels: 0 background, 1..20 the classes above.
LABEL_NAMES: tuple[str, ...] = ("background",) + CLASS_NAMES
NUM_LABELS = len(LABEL_NAMES)  # segmenter outputs, confusion-matrix size
IGNORE_INDEX = 255


def class_ids_of(multi_hot) -> list[int]:
    """The 0-based class indices (into CLASS_NAMES and the classifier's logits) set in a (20,)
    multi-hot vector (NumPy array or tensor); the label value of index i is i + 1."""
    return [int(i) for i in np.flatnonzero(np.asarray(multi_hot) > 0.5)]


# Class indices (0-based, as logits and IRN's/PSA's files count) and label values (1..20, as masks
# and our CAM files store them) differ by one; these two are the only places that know by how much.
def label_values_of(class_ids) -> np.ndarray:
    """Label values (int64) of 0-based class indices."""
    return np.asarray(class_ids, dtype=np.int64) + 1


def class_ids_from(label_values) -> np.ndarray:
    """0-based class indices (int64) of label values 1..20."""
    return np.asarray(label_values, dtype=np.int64) - 1


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The standard VOC palette: bits of the label index spread over the high bits of R, G, B."""
    colours = []
    for label in range(n):
        r = g = b = 0
        value = label
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours


def voc_palette() -> list[int]:
    """Flat 768-entry palette for ``PIL.Image.putpalette``."""
    return [channel for colour in voc_colormap() for channel in colour]
