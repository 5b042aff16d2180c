"""The MS COCO 2014 WSSS layout: COCO's own image folders, the semantic masks and the image-level
label table that the COCO WSSS papers distribute, and id lists.

Layout::

    ROOT/train2014/<id>.jpg, ROOT/val2014/<id>.jpg    (COCO's zips; also under ROOT/JPEGImages/ or ROOT/images/)
    ROOT/SegmentationClass/train2014/<id>.png, .../val2014/<id>.png   (or all in ROOT/SegmentationClass/)
    ROOT/cls_labels_coco.npy (or ROOT/cls_labels.npy)  dict id -> float[80], as IRN's VOC table
    ROOT/ImageSets/train2014.txt, ROOT/ImageSets/val2014.txt   (split names; any list file works too)

Masks hold 0 background, 1..80 the COCO things in category-id order (:data:`wsss.classes.COCO_CLASS_NAMES`)
and 255 ignored. Ids are COCO's file stems (``COCO_train2014_000000000009``); an id's image folder
is the one its name says, else the first image folder holding it. A ``ROOT/label_set.yaml`` replaces
the 80 classes (a subset or another dataset in this layout).
"""
from __future__ import annotations

from pathlib import Path

from wsss.data.voc import DatasetLayout, dataset_label_set
from wsss.errors import DataError

IMAGE_FOLDERS = ("train2014", "val2014")
IMAGE_PARENTS = (".", "JPEGImages", "images")  # where COCO's image folders may sit under ROOT
MASK_FOLDER = "SegmentationClass"
LABEL_TABLE_NAMES = ("cls_labels_coco.npy", "cls_labels.npy")
LIST_FOLDER = "ImageSets"


def find_image_parent(root: Path) -> Path | None:
    """The folder under ``root`` that holds COCO's ``train2014/`` or ``val2014/``, or None."""
    for parent in IMAGE_PARENTS:
        if any((root / parent / folder).is_dir() for folder in IMAGE_FOLDERS):
            return (root / parent).resolve() if parent != "." else root
    return None


def is_coco_layout(root: Path) -> bool:
    return find_image_parent(root) is not None


class COCOLayout(DatasetLayout):
    """Paths of one COCO 2014 WSSS dataset; raises DataError if ``root`` is not one."""

    def __init__(self, root: str | Path, mask_dir: str | Path | None = None):
        given = Path(root).expanduser()
        parent = find_image_parent(given) if given.is_dir() else None
        if parent is None:
            raise DataError(f"{given} is not a COCO 2014 layout: no train2014/ or val2014/ image folder in it, in JPEGImages/ or in images/")
        self.root = given
        self.labels = dataset_label_set(given, "coco")
        self.image_folders = [parent / folder for folder in IMAGE_FOLDERS if (parent / folder).is_dir()]
        self.mask_dir = Path(mask_dir) if mask_dir is not None else given / MASK_FOLDER
        self.split_masks = mask_dir is None and any((self.mask_dir / folder).is_dir() for folder in IMAGE_FOLDERS)
        self.annotation_dir = given / "Annotations"  # COCO has no VOC XML files: labels come from the table or the masks
        self.label_table = next((given / name for name in LABEL_TABLE_NAMES if (given / name).is_file()), given / LABEL_TABLE_NAMES[0])
        self.list_dir = given / LIST_FOLDER
        self._folder_of: dict[str, Path] = {}

    def image_folder(self, image_id: str) -> Path:
        """``train2014/`` for ``COCO_train2014_...``; otherwise the first image folder holding the id."""
        if image_id not in self._folder_of:
            named = [f for f in self.image_folders if f"_{f.name}_" in f"_{image_id}_"]
            holding = [f for f in self.image_folders if (f / f"{image_id}.jpg").is_file()]
            self._folder_of[image_id] = (named or holding or self.image_folders)[0]
        return self._folder_of[image_id]

    def image_path(self, image_id: str) -> Path:
        return self.image_folder(image_id) / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        if self.split_masks:
            return self.mask_dir / self.image_folder(image_id).name / f"{image_id}.png"
        return self.mask_dir / f"{image_id}.png"
