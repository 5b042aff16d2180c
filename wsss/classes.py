"""PASCAL VOC class names and colours, defined once for the whole package."""
from __future__ import annotations

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
