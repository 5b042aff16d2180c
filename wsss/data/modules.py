"""Lightning DataModules. Their typed ``__init__`` signatures are the ``data:`` config sections."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from wsss.classes import LabelSet
from wsss.data import open_layout
from wsss.data.datasets import ClassificationDataset, SegmentationDataset
from wsss.data.transforms import eval_transform, fit_transform, train_transform
from wsss.data.voc import ImageLabels
from wsss.errors import ConfigError, DataError, name_some
from wsss.formats.label_png import read_label_png

log = logging.getLogger(__name__)


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r of N takes items r, r + N, r + 2N, ... in order: every item on exactly one rank.

    torch's DistributedSampler, which Lightning puts under validation loaders, repeats items
    until every rank has as many, so a val set of 5 on 2 ranks scores one image twice. Here
    ranks may differ by one item, and a rank gets none when there are fewer items than ranks
    (Lightning's own predict sampler refuses that, which a resumed run with one image left hits).
    Being a DistributedSampler, Lightning leaves it in place instead of adding its own.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def unpadded_sampler(dataset: Sized, trainer: pl.Trainer | None) -> UnpaddedDistributedSampler | None:
    """:class:`UnpaddedDistributedSampler` for this process under multi-process strategies, else
    None (the DataLoader's plain in-order sampler)."""
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    if not kwargs or kwargs["num_replicas"] <= 1:
        return None
    return UnpaddedDistributedSampler(dataset, kwargs["num_replicas"], kwargs["rank"])


def validation_sampler(dataset: Sized, trainer: pl.Trainer | None, option: str) -> UnpaddedDistributedSampler | None:
    """:func:`unpadded_sampler` for a validation set, which must give every process one item:
    DDP syncs buffers at each process's first validation forward and metrics gather from all."""
    sampler = unpadded_sampler(dataset, trainer)
    if sampler is not None and len(dataset) < sampler.num_replicas:
        raise ConfigError(
            f"{option} has {len(dataset)} images, fewer than the {sampler.num_replicas} processes; "
            "each process needs at least one validation image"
        )
    return sampler


class PredictDataModule(pl.LightningDataModule):
    """Feeds a predict stage: every item of ``dataset`` to exactly one process, in order.

    The loader is built after Lightning has started the processes, so it knows this one's rank;
    a process may get no item at all (fewer pending images than processes).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, num_workers: int = 0, collate_fn: Callable | None = None):
        super().__init__()
        self.dataset, self.batch_size, self.num_workers, self.collate_fn = dataset, batch_size, num_workers, collate_fn
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, sampler=unpadded_sampler(self.dataset, self.trainer),
            num_workers=self.num_workers, collate_fn=self.collate_fn,
        )


class ClassificationDataModule(pl.LightningDataModule):
    """Images with image-level labels for training the classifier.

    Args:
        root: VOC2012 folder (or VOCdevkit, or its parent), a COCO 2014 folder (:mod:`wsss.data.coco`), or ``toy``
            for the built-in toy dataset; required (no silent toy default).
        train_split: split name under ImageSets/Segmentation (COCO: ImageSets/), or a list file path.
        val_split: as ``train_split``; validation measures mAP / F1 on it.
        labels: image-level label source: ``auto`` (Annotations/ if present, else the root's
            ``cls_labels.npy`` if present, else masks),
            ``annotations``, ``masks``, or a path to an IRN-style ``cls_labels.npy``.
        crop_size: training crop (and validation canvas) side in pixels.
        scale_range: random rescale factors for training.
        color_jitter: brightness/contrast/saturation jitter strength (0 disables).
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train_aug",
        val_split: str = "val",
        labels: str = "auto",
        crop_size: int = 321,
        scale_range: tuple[float, float] = (0.7, 1.3),
        color_jitter: float = 0.3,
        batch_size: int = 16,
        num_workers: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: ClassificationDataset | None = None
        self.val_set: ClassificationDataset | None = None
        self.labels: LabelSet | None = None  # the dataset's label set, known after setup

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        layout = open_layout(hp.root)
        self.labels = layout.labels
        image_labels = ImageLabels(layout, hp.labels)
        # Validate everything up front, so a bad dataset fails before the first step, not hours in.
        train_ids, val_ids = layout.read_ids(hp.train_split), layout.read_ids(hp.val_split)
        for ids in (train_ids, val_ids):
            layout.check_images(ids)
            image_labels.check(ids)
        log.info("classifier data: %s, %d train / %d val images, labels from %s", layout.root, len(train_ids), len(val_ids), image_labels.description)
        self.train_set = ClassificationDataset(layout, train_ids, image_labels, train_transform(hp.crop_size, tuple(hp.scale_range), True, hp.color_jitter))
        self.val_set = ClassificationDataset(layout, val_ids, image_labels, fit_transform(hp.crop_size))

    def _loader(self, dataset, shuffle: bool, sampler: DistributedSampler | None = None) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset, batch_size=hp.batch_size, shuffle=shuffle, drop_last=shuffle, sampler=sampler, num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0, pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # Every val image exactly once across DDP processes, so mAP is the single-process value.
        return self._loader(self.val_set, shuffle=False, sampler=validation_sampler(self.val_set, self.trainer, "--data.val_split"))


def present_label_classes(path: Path, labels: LabelSet) -> frozenset[int]:
    """The foreground label values present in one label PNG (background and ignore left out)."""
    values = np.flatnonzero(np.bincount(read_label_png(path, labels=labels).reshape(-1), minlength=256))
    return frozenset(int(v) for v in values if v != labels.background and v < labels.num_labels)


def repeat_factors(image_classes: list[frozenset[int]], threshold: float) -> np.ndarray:
    """LVIS's repeat factor of each image: max over its classes c of max(1, sqrt(threshold / f_c)),
    f_c the share of the images that hold c; 1 for an image without foreground."""
    counts: dict[int, int] = {}
    for classes in image_classes:
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
    total = len(image_classes)
    class_factor = {c: max(1.0, float(np.sqrt(threshold / (n / total)))) for c, n in counts.items()}
    return np.array([max((class_factor[c] for c in classes), default=1.0) for classes in image_classes])


GT_LABELS = "gt"  # ``train_labels`` value meaning "the dataset's own GT masks" (the upper bound)


class SegmentationDataModule(pl.LightningDataModule):
    """Images with dense labels for training the segmenter; GT masks for validation.

    Args:
        train_labels: directory of ``<id>.png`` label maps to train on (pseudo-labels of any
            method, values 0..20 or 255), or ``gt`` for the dataset's GT masks (the fully
            supervised upper bound).
        root: VOC2012 folder (or VOCdevkit, or its parent), a COCO 2014 folder (:mod:`wsss.data.coco`), or ``toy``
            for the built-in toy dataset; required (no silent toy default).
        train_split: split name under ImageSets/Segmentation (COCO: ImageSets/), or a list file path.
        val_split: as ``train_split``; validation scores mIoU on full-size images against the GT
            masks (SegmentationClassAug if present, else SegmentationClass).
        crop_size: training crop side; 8k+1 (321) aligns the stride-8 logits with pixels.
        scale_range: random rescale factors for training (DeepLab's 0.5..1.5).
        flip: random horizontal flips in training.
        color_jitter: brightness/contrast/saturation jitter strength (0, DeepLab's choice, disables).
        batch_size: training images per batch (per process under DDP); validation uses 1.
        num_workers: DataLoader worker processes.
        repeat_factor_threshold: class-balanced sampling (LVIS's repeat-factor sampling, Gupta et al. 2019):
            an image is drawn max(1, sqrt(t / f)) times as often, f the smallest share of training images
            that hold one of its label classes; none draws every image equally (DeepLab).
    """

    def __init__(
        self,
        train_labels: str,
        root: str,
        train_split: str = "train_aug",
        val_split: str = "val",
        crop_size: int = 321,
        scale_range: tuple[float, float] = (0.5, 1.5),
        flip: bool = True,
        color_jitter: float = 0.0,
        batch_size: int = 10,
        num_workers: int = 4,
        repeat_factor_threshold: float | None = None,
    ):
        super().__init__()
        if repeat_factor_threshold is not None and not 0 < repeat_factor_threshold <= 1:
            raise ConfigError(f"data.repeat_factor_threshold must be in (0, 1], got {repeat_factor_threshold}")
        self.save_hyperparameters()
        self.train_set: SegmentationDataset | None = None
        self.val_set: SegmentationDataset | None = None
        self.labels: LabelSet | None = None  # the dataset's label set, known after setup

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        layout = open_layout(hp.root)
        self.labels = layout.labels
        # Validate lists, images and label files up front, so a bad input fails before the first
        # step. Label *values* are checked as each PNG is read (read_label_png names the file).
        val_ids = layout.read_ids(hp.val_split)
        layout.check_images(val_ids)
        layout.check_masks(val_ids)
        if stage in ("validate", "test"):
            self.val_set = SegmentationDataset(layout, val_ids, layout.mask_dir_for(val_ids), eval_transform())
            return
        train_ids = layout.read_ids(hp.train_split)
        layout.check_images(train_ids)
        label_dir = layout.mask_dir_for(train_ids) if str(hp.train_labels) == GT_LABELS else Path(hp.train_labels).expanduser()
        if not label_dir.is_dir():
            raise DataError(f"train_labels directory not found: {label_dir} (give a folder of <id>.png pseudo-labels, or 'gt')")
        missing = [i for i in train_ids if not (label_dir / f"{i}.png").is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(train_ids)} '{hp.train_split}' ids have no label PNG in {label_dir}: {name_some(missing)}"
            )
        log.info("segmentation data: %s, %d train images labelled by %s / %d val images", layout.root, len(train_ids), label_dir, len(val_ids))
        transform = train_transform(hp.crop_size, tuple(hp.scale_range), hp.flip, hp.color_jitter)
        self.train_set = SegmentationDataset(layout, train_ids, label_dir, transform)
        self.val_set = SegmentationDataset(layout, val_ids, layout.mask_dir_for(val_ids), eval_transform())

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        sampler = None
        if hp.repeat_factor_threshold is not None:
            classes = [present_label_classes(self.train_set.mask_dir / f"{i}.png", self.labels) for i in self.train_set.ids]
            factors = repeat_factors(classes, hp.repeat_factor_threshold)
            log.info("repeat-factor sampling (t = %g): images drawn up to %.2fx as often, %d of %d above 1x",
                     hp.repeat_factor_threshold, factors.max(), int((factors > 1).sum()), len(factors))
            sampler = WeightedRandomSampler(factors.tolist(), num_samples=len(factors), replacement=True)
        return DataLoader(
            self.train_set, batch_size=hp.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
            num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        # Batch 1: validation images keep their own sizes (no resize, no padding into the score).
        # Every val image exactly once across DDP processes, so mIoU is the single-process value.
        hp = self.hparams
        return DataLoader(
            self.val_set, batch_size=1, shuffle=False, sampler=validation_sampler(self.val_set, self.trainer, "--data.val_split"),
            num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
        )
