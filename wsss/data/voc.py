"""The VOC 2012 on-disk layout: where images, masks, annotations and id lists live.

Layout (SPEC.md "Data layout")::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClassAug/<id>.png   (preferred) or ROOT/SegmentationClass/<id>.png
    ROOT/Annotations/<id>.xml            (optional: image-level labels)
    ROOT/cls_labels.npy                  (optional: IRN's label table, used when Annotations/ is absent)
    ROOT/ImageSets/Segmentation/{train,val,train_aug}.txt

``ROOT`` may be the ``VOC2012`` folder itself, ``VOCdevkit`` or the folder holding ``VOCdevkit``.
A ``ROOT/label_set.yaml`` (or ``.json``: :func:`wsss.classes.label_set`) makes it a dataset of other
classes in the same layout; COCO 2014's layout is :mod:`wsss.data.coco`, and :func:`wsss.data.open_layout`
picks the right one.
"""
from __future__ import annotations

import logging
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from wsss.classes import LABEL_SETS, LabelSet, class_ids_from, label_set
from wsss.errors import ConfigError, DataError, name_some
from wsss.formats.images import image_size
from wsss.formats.irn import read_label_table
from wsss.formats.label_png import check_mask_size, read_label_png

log = logging.getLogger(__name__)

# IRN's image-level label table (built from Annotations/), used by ``labels: auto`` when a dataset
# ships it instead of the XML files.
LABEL_TABLE_NAME = "cls_labels.npy"
# A dataset of its own classes says so beside its images (names, background, ignore).
LABEL_SET_FILES = ("label_set.yaml", "label_set.yml", "label_set.json")

# An image id is a plain file stem: no separators, no leading dot, so it can never escape the root.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


def dataset_label_set(root: Path, default: str) -> LabelSet:
    """The label set a dataset folder declares in ``label_set.yaml``/``.json``, else the built-in ``default``."""
    declared = next((root / name for name in LABEL_SET_FILES if (root / name).is_file()), None)
    if declared is None:
        return LABEL_SETS[default]
    labels = label_set(declared)
    if labels.background != 0:  # the classifier's output k is label value k + 1 throughout the stages
        raise ConfigError(f"{declared}: a dataset's background must be label value 0 (its classes 1..N), got {labels.background}")
    return labels


class DatasetLayout:
    """What every dataset layout offers the stages: ``root``, ``labels`` (its :class:`LabelSet`),
    ``image_path``/``mask_path`` of an id, ``mask_dir`` (the GT folder), ``annotation_dir`` and
    ``label_table`` (image-level label sources, possibly absent), and split lists."""

    root: Path
    labels: LabelSet
    mask_dir: Path
    annotation_dir: Path
    label_table: Path
    list_dir: Path  # where split names resolve to <name>.txt

    @property
    def num_classes(self) -> int:
        """Foreground classes: the classifier's outputs, the CAM files' largest label value."""
        return self.labels.num_labels - 1

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def mask_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def list_path(self, split: str | Path) -> Path:
        """A split name (``train``) maps to ``list_dir/<name>.txt``; anything with a path separator or
        ``.txt`` suffix is taken as an explicit list file."""
        text = str(split)
        if "/" in text or text.endswith(".txt"):
            return Path(text).expanduser()
        return self.list_dir / f"{text}.txt"

    def mask_dir_for(self, ids: list[str]) -> Path:
        """The one folder holding the GT masks of ``ids`` (the evaluators take a folder)."""
        folders = sorted({self.mask_path(i).parent for i in ids})
        if len(folders) > 1:
            raise DataError(f"the listed ids have their masks in {len(folders)} folders ({name_some([str(f) for f in folders])}): "
                            "score one split at a time")
        return folders[0] if folders else self.mask_dir

    def read_ids(self, split: str | Path) -> list[str]:
        """Ids of a split, validated: see :func:`read_id_list`."""
        return read_id_list(self.list_path(split))

    def check_images(self, ids: list[str]) -> None:
        """Raise one DataError naming every listed id whose JPEG is missing."""
        missing = [i for i in ids if not self.image_path(i).is_file()]
        if missing:
            where = self.image_path(missing[0]).parent
            raise DataError(f"{len(missing)} listed ids have no image in {where}: {name_some(missing)}")

    def check_masks(self, ids: list[str]) -> None:
        missing = [i for i in ids if not self.mask_path(i).is_file()]
        if missing:
            raise DataError(f"{len(missing)} listed ids have no mask in {self.mask_path(missing[0]).parent}: {name_some(missing)}")


class VOCLayout(DatasetLayout):
    """Paths of one VOC-layout dataset, resolved once; raises DataError if ``root`` is not one."""


    def __init__(self, root: str | Path, mask_dir: str | Path | None = None):
        given = Path(root).expanduser()
        if not given.exists():
            raise DataError(f"data root not found: {given}")
        candidates = [given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"]
        found = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
        if found is None:
            raise DataError(
                f"{given} is not a VOC-layout dataset: no JPEGImages/ in it, in VOC2012/ or in "
                "VOCdevkit/VOC2012/ (create a toy one with `wsss make-toy-voc DIR`; COCO 2014: see `wsss.data.coco`)"
            )
        self.root = found
        self.labels = dataset_label_set(found, "voc")
        self.image_dir = found / "JPEGImages"
        self.annotation_dir = found / "Annotations"
        self.label_table = found / LABEL_TABLE_NAME
        self.list_dir = found / "ImageSets" / "Segmentation"
        if mask_dir is not None:
            self.mask_dir = Path(mask_dir)
        else:
            aug = found / "SegmentationClassAug"
            self.mask_dir = aug if aug.is_dir() else found / "SegmentationClass"

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"



def read_id_list(path: str | Path) -> list[str]:
    """Read a list of image ids, one per line.

    Blank lines and Windows line endings are accepted; duplicate ids are dropped with a warning;
    a line that is not a plain id (a path, ``../x``, an absolute path) is an error, never opened.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list file ({exc})") from None
    ids: list[str] = []
    seen: set[str] = set()
    bad: list[str] = []
    duplicates = 0
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry:
            continue
        if not _ID_PATTERN.match(entry):
            bad.append(f"line {number}: {entry!r}")
        elif entry in seen:
            duplicates += 1
        else:
            seen.add(entry)
            ids.append(entry)
    if bad:
        raise DataError(f"{path}: lines that are not plain image ids (e.g. 2007_000032): {name_some(bad)}")
    if duplicates:
        warnings.warn(f"{path}: {duplicates} duplicate ids ignored", stacklevel=2)
    if not ids:
        raise DataError(f"{path}: list file holds no image ids")
    return ids


def multi_hot_from_mask(mask: np.ndarray, labels: LabelSet = LABEL_SETS["voc"]) -> np.ndarray:
    """Multi-hot (num_classes,) float32 of the classes present in a mask (VOC: values 1..20;
    background and ignore left out)."""
    classes = np.unique(mask)
    classes = classes[(classes != 0) & (classes < labels.num_labels)]
    multi_hot = np.zeros(labels.num_labels - 1, dtype=np.float32)
    multi_hot[class_ids_from(classes)] = 1.0
    return multi_hot


def multi_hot_from_annotation(path: Path, labels: LabelSet = LABEL_SETS["voc"]) -> np.ndarray:
    """Multi-hot (num_classes,) float32 of the object classes named in a VOC annotation XML."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: unreadable annotation XML ({exc})") from None
    class_names = labels.names[1:]
    multi_hot = np.zeros(len(class_names), dtype=np.float32)
    for name in tree.getroot().iter("name"):
        # <name> also appears inside <part> of person layouts; only object names are classes.
        text = (name.text or "").strip()
        if text in class_names:
            multi_hot[class_names.index(text)] = 1.0
    return multi_hot


def _irn_key(image_id: str) -> int | None:
    digits = image_id.replace("_", "")
    return int(digits) if digits.isdigit() else None


def table_keys(image_id: str) -> list[str | int]:
    """The keys a label table may file ``image_id`` under: the id itself, IRN's integer (2007_000032 ->
    2007000032), and for COCO's ``COCO_train2014_000000000009`` its number as text and as an integer
    (the COCO WSSS tables differ in which they use)."""
    keys: list[str | int] = [image_id]
    if (irn := _irn_key(image_id)) is not None:
        keys.append(irn)
    tail = image_id.rsplit("_", 1)[-1]
    if tail != image_id and tail.isdigit():
        keys += [tail, int(tail)]
    return keys


class ImageLabels:
    """Image-level labels of a dataset, from one source chosen once and logged.

    ``source``: ``"auto"`` (Annotations/ if the folder exists, else ``ROOT/cls_labels.npy`` if that
    file exists, else masks: the first two are the field's XML-derived labels), ``"annotations"``,
    ``"masks"``, or the path of an IRN-style ``cls_labels.npy`` (dict id -> float[num_classes]; ids
    as any of :func:`table_keys`). Rows have the layout's class count (VOC 20, COCO 80).
    """

    def __init__(self, layout: DatasetLayout, source: str | Path = "auto"):
        self.layout = layout
        self.num_classes = layout.num_classes
        self._table: dict | None = None
        text = str(source)
        if text == "auto":
            if layout.annotation_dir.is_dir():
                text = "annotations"
            elif layout.label_table.is_file():
                text = str(layout.label_table)
            else:
                text = "masks"
        if text == "annotations":
            self.kind, self.description = "annotations", f"object annotations in {layout.annotation_dir}"
        elif text == "masks":
            self.kind, self.description = "masks", f"classes present in the masks of {layout.mask_dir}"
        else:
            self.kind, self.description = "table", f"label table {text}"
            self._table = read_label_table(text)
        self.table_path = None if self._table is None else Path(text)
        log.info("image-level labels from %s", self.description)

    def identity(self) -> str:
        """What the labels are, for a stage folder's record: ``annotations``, ``masks`` or the
        table's SHA-256 (so a copied table is the same labels, an edited one is not)."""
        from wsss.records import file_digest

        return self.kind if self.table_path is None else f"table:{file_digest(self.table_path)}"

    def path_of(self, image_id: str) -> Path | None:
        """File the labels of ``image_id`` are read from (None for a table)."""
        if self.kind == "annotations":
            return self.layout.annotation_dir / f"{image_id}.xml"
        if self.kind == "masks":
            return self.layout.mask_path(image_id)
        return None

    def check(self, ids: list[str]) -> None:
        """Raise one DataError naming every id whose labels are missing."""
        if self._table is not None:
            missing = [i for i in ids if not any(key in self._table for key in table_keys(i))]
            where = self.description
        else:
            missing = [i for i in ids if not self.path_of(i).is_file()]
            where = str(self.path_of("x").parent)
        if missing:
            raise DataError(f"{len(missing)} listed ids have no image-level labels in {where}: {name_some(missing)}")

    def __call__(self, image_id: str) -> np.ndarray:
        if self._table is not None:
            row = next((self._table[key] for key in table_keys(image_id) if key in self._table), None)
            if row is None:
                raise DataError(f"{image_id}: no entry in {self.description}")
            row = np.asarray(row, dtype=np.float32).reshape(-1)
            if row.shape != (self.num_classes,):
                raise DataError(f"{image_id}: entry in {self.description} has {row.size} values, expected {self.num_classes} "
                                f"(the classes of label set {self.layout.labels.name!r})")
            return row
        if self.kind == "annotations":
            return multi_hot_from_annotation(self.path_of(image_id), self.layout.labels)
        mask_path = self.path_of(image_id)
        mask = read_label_png(mask_path, labels=self.layout.labels)
        # The classes of another image's mask would be silently wrong labels: compare sizes
        # (the image's header only, no decoding).
        image_path = self.layout.image_path(image_id)
        check_mask_size(mask_path, mask.shape, image_path, image_size(image_path))
        return multi_hot_from_mask(mask, self.layout.labels)
