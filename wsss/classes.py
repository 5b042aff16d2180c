"""PASCAL VOC class names and colours, defined once for the whole package.

Words used throughout: ``class_ids`` are 0-based indices into the 20 classes (the classifier's
logits); ``classes`` are label values 1..20 (as in masks and CAM files); a ``multi_hot`` is the
(20,) image-level vector; a ``label_map`` is an (H, W) uint8 map of label values (0 background,
255 ignored).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.errors import ConfigError
from wsss.options import read_yaml

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


# ----------------------------------------------------------------------------- label sets

# MS COCO 2014's 80 things in category-id order: the semantic masks the COCO WSSS papers distribute
# store background as 0 and these as 1..80.
COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class LabelSet:
    """The labels of a segmentation dataset: ``names[v]`` is label value ``v`` (``background``
    among them), ``ignore`` the GT value left out of every score. VOC and COCO are built in
    (:data:`LABEL_SETS`); :func:`label_set` also reads a user's own from YAML or JSON."""

    name: str
    names: tuple[str, ...]
    background: int = 0
    ignore: int = IGNORE_INDEX

    def __post_init__(self):
        if len(self.names) < 2 or len(set(self.names)) != len(self.names) or not all(isinstance(n, str) and n for n in self.names):
            raise ConfigError(f"label set {self.name!r}: 'names' must be two or more distinct non-empty names, background included")
        if not 0 <= self.background < len(self.names):
            raise ConfigError(f"label set {self.name!r}: background {self.background} is not a label value (0..{len(self.names) - 1})")
        if not len(self.names) <= self.ignore <= 255:  # label PNGs are 8-bit; the ignore value must be none of the labels
            raise ConfigError(f"label set {self.name!r}: ignore must be in {len(self.names)}..255 (above every label value), got {self.ignore}")

    @property
    def num_labels(self) -> int:
        return len(self.names)


LABEL_SETS: dict[str, LabelSet] = {
    "voc": LabelSet("voc", LABEL_NAMES),
    "coco": LabelSet("coco", ("background", *COCO_CLASS_NAMES)),
}


def label_set(spec: str | Path | LabelSet) -> LabelSet:
    """A built-in label set (``voc``, ``coco``) or one from a YAML/JSON file with ``names`` (label
    value order, background included) and optionally ``background`` and ``ignore``."""
    if isinstance(spec, LabelSet):
        return spec
    if str(spec) in LABEL_SETS:
        return LABEL_SETS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"label set {str(spec)!r}: neither built in ({', '.join(LABEL_SETS)}) nor a YAML/JSON file")
    raw = read_yaml(path, "label set")  # YAML is a superset of JSON: one reader for both
    unknown = sorted(set(raw) - {"name", "names", "background", "ignore"})
    if unknown or "names" not in raw or not isinstance(raw["names"], list):
        raise ConfigError(f"{path}: a label set is a mapping with 'names' (a list, background included) and optionally "
                          f"'background', 'ignore', 'name'" + (f"; unknown keys {unknown}" if unknown else ""))
    return LabelSet(str(raw.get("name", path.stem)), tuple(raw["names"]), int(raw.get("background", 0)),
                    int(raw.get("ignore", IGNORE_INDEX)))
