"""Torch datasets over a VOC layout. Items are dicts keyed by name; ``id`` is always present."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from wsss.data.transforms import to_tv
from wsss.data.voc import DatasetLayout, ImageLabels
from wsss.formats.images import read_image
from wsss.formats.label_png import check_mask_size, read_label_png


class ClassificationDataset(Dataset):
    """``{"id", "image" (3,h,w) float, "multi_hot" (num_classes,) float}`` for training the classifier."""

    def __init__(self, layout: DatasetLayout, ids: list[str], image_labels: ImageLabels, transform: Callable):
        self.layout, self.ids, self.image_labels, self.transform = layout, ids, image_labels, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.transform(*to_tv(read_image(self.layout.image_path(image_id))))
        return {"id": image_id, "image": image, "multi_hot": torch.from_numpy(self.image_labels(image_id))}


class SegmentationDataset(Dataset):
    """``{"id", "image" (3,h,w) float, "mask" (h,w) int64}``; masks come from ``mask_dir``
    (GT, or any method's pseudo-labels), checked against the image size."""

    def __init__(self, layout: DatasetLayout, ids: list[str], mask_dir, transform: Callable):
        from pathlib import Path

        self.layout, self.ids, self.mask_dir, self.transform = layout, ids, Path(mask_dir), transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.layout.image_path(image_id))
        mask_path = self.mask_dir / f"{image_id}.png"
        mask = read_label_png(mask_path, labels=self.layout.labels)
        check_mask_size(mask_path, mask.shape, self.layout.image_path(image_id), image.shape)
        image_t, mask_t = self.transform(*to_tv(image, mask))
        return {"id": image_id, "image": image_t, "mask": mask_t.long()}


class ImageDataset(Dataset):
    """Full-size images for predict stages: ``{"id", "image" (3,H,W) float normalised, "size" (H, W),
    "multi_hot" (20,) float}`` (``multi_hot`` only when ``image_labels`` are given)."""

    def __init__(self, layout: DatasetLayout, ids: list[str], transform: Callable, image_labels: ImageLabels | None = None):
        self.layout, self.ids, self.transform, self.image_labels = layout, ids, transform, image_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.layout.image_path(image_id))
        item = {"id": image_id, "image": self.transform(*to_tv(image)), "size": tuple(image.shape[:2])}
        if self.image_labels is not None:
            item["multi_hot"] = torch.from_numpy(self.image_labels(image_id))
        return item


def collate_list(batch: list[dict]) -> dict:
    """Collate images of different sizes: tensors are kept as lists, except equal-shaped ones."""
    out: dict = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
