"""The VOC 2012 on-disk layout: where images, masks, annotations and id lists live.

Layout (SPEC.md "Data layout")::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClassAug/<id>.png   (preferred) or ROOT/SegmentationClass/<id>.png
    ROOT/Annotations/<id>.xml            (optional: image-level labels)
    ROOT/cls_labels.npy                  (optional: IRN's label table, used when Annotations/ is absent)
    ROOT/ImageSets/Segmentation/{train,val,train_aug}.txt

``ROOT`` may be the ``VOC2012`` folder itself, ``VOCdevkit`` or the folder holding ``VOCdevkit``.
"""
from __future__ import annotations

import logging
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from wsss.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from wsss.errors import DataError, name_some
from wsss.formats.images import image_size
from wsss.formats.irn import read_label_table
from wsss.formats.label_png import check_mask_size, read_label_png

log = logging.getLogger(__name__)

# IRN's image-level label table (built from Annotations/), used by ``labels: auto`` when a dataset
# ships it instead of the XML files.
LABEL_TABLE_NAME = "cls_labels.npy"

# An image id is a plain file stem: no separators, no leading dot, so it can never escape the root.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


class VOCLayout:
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
                "VOCdevkit/VOC2012/ (create a toy one with `wsss make-toy-voc DIR`)"
            )
        self.root = found
        self.image_dir = found / "JPEGImages"
        self.annotation_dir = found / "Annotations"
        self.label_table = found / LABEL_TABLE_NAME
        if mask_dir is not None:
            self.mask_dir = Path(mask_dir)
        else:
            aug = found / "SegmentationClassAug"
            self.mask_dir = aug if aug.is_dir() else found / "SegmentationClass"

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def list_path(self, split: str | Path) -> Path:
        """A split name (``train_aug``) maps to ImageSets/Segmentation/<name>.txt; anything with a
        path separator or ``.txt`` suffix is taken as an explicit list file."""
        text = str(split)
        if "/" in text or text.endswith(".txt"):
            return Path(text).expanduser()
        return self.root / "ImageSets" / "Segmentation" / f"{text}.txt"

    def read_ids(self, split: str | Path) -> list[str]:
        """Ids of a split, validated: see :func:`read_id_list`."""
        return read_id_list(self.list_path(split))

    def check_images(self, ids: list[str]) -> None:
        """Raise one DataError naming every listed id whose JPEG is missing."""
        missing = [i for i in ids if not self.image_path(i).is_file()]
        if missing:
            raise DataError(f"{len(missing)} listed ids have no image in {self.image_dir}: {name_some(missing)}")

    def check_masks(self, ids: list[str]) -> None:
        missing = [i for i in ids if not self.mask_path(i).is_file()]
        if missing:
            raise DataError(f"{len(missing)} listed ids have no mask in {self.mask_dir}: {name_some(missing)}")


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


def multi_hot_from_mask(mask: np.ndarray) -> np.ndarray:
    """Multi-hot (20,) float32 of the classes present in a mask (values 1..20; 0 and 255 ignored)."""
    classes = np.unique(mask)
    classes = classes[(classes != 0) & (classes != IGNORE_INDEX)]
    multi_hot = np.zeros(NUM_CLASSES, dtype=np.float32)
    multi_hot[classes.astype(np.int64) - 1] = 1.0
    return multi_hot


def multi_hot_from_annotation(path: Path) -> np.ndarray:
    """Multi-hot (20,) float32 of the object classes named in a VOC annotation XML."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: unreadable annotation XML ({exc})") from None
    multi_hot = np.zeros(NUM_CLASSES, dtype=np.float32)
    for name in tree.getroot().iter("name"):
        # <name> also appears inside <part> of person layouts; only object names are classes.
        text = (name.text or "").strip()
        if text in CLASS_NAMES:
            multi_hot[CLASS_NAMES.index(text)] = 1.0
    return multi_hot


def _irn_key(image_id: str) -> int | None:
    digits = image_id.replace("_", "")
    return int(digits) if digits.isdigit() else None


class ImageLabels:
    """Image-level labels of a dataset, from one source chosen once and logged.

    ``source``: ``"auto"`` (Annotations/ if the folder exists, else ``ROOT/cls_labels.npy`` if that
    file exists, else masks: the first two are the field's XML-derived labels), ``"annotations"``,
    ``"masks"``, or the path of an IRN-style ``cls_labels.npy`` (dict id -> float[20]; ids as
    strings or as IRN's integers, 2007_000032 -> 2007000032).
    """

    def __init__(self, layout: VOCLayout, source: str | Path = "auto"):
        self.layout = layout
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
            missing = [i for i in ids if i not in self._table and _irn_key(i) not in self._table]
            where = self.description
        else:
            missing = [i for i in ids if not self.path_of(i).is_file()]
            where = str(self.path_of("x").parent)
        if missing:
            raise DataError(f"{len(missing)} listed ids have no image-level labels in {where}: {name_some(missing)}")

    def __call__(self, image_id: str) -> np.ndarray:
        if self._table is not None:
            row = self._table.get(image_id, self._table.get(_irn_key(image_id)))
            if row is None:
                raise DataError(f"{image_id}: no entry in {self.description}")
            row = np.asarray(row, dtype=np.float32).reshape(-1)
            if row.shape != (NUM_CLASSES,):
                raise DataError(f"{image_id}: entry in {self.description} has {row.size} values, expected {NUM_CLASSES}")
            return row
        if self.kind == "annotations":
            return multi_hot_from_annotation(self.path_of(image_id))
        mask_path = self.path_of(image_id)
        mask = read_label_png(mask_path)
        # The classes of another image's mask would be silently wrong labels: compare sizes
        # (the image's header only, no decoding).
        image_path = self.layout.image_path(image_id)
        check_mask_size(mask_path, mask.shape, image_path, image_size(image_path))
        return multi_hot_from_mask(mask)
