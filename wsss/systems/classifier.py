"""The system of stage 1: trains :class:`~wsss.models.classifier.CAMClassifier` (``wsss train-cls``)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from wsss.classes import NUM_CLASSES
from wsss.models.classifier import CAMClassifier
from wsss.systems.state_dicts import check_class_count, check_state_dict
from wsss.systems.schedules import per_step_schedule, schedule_factor


class PositiveCounts(Metric):
    """Per-class count of positive targets, summed across processes."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.add_state("counts", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, targets: torch.Tensor) -> None:
        self.counts += targets.sum(0).long()

    def compute(self) -> torch.Tensor:
        return self.counts


def mean_ap_of_present_classes(ap: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean of per-class AP over classes with at least one positive (others have no defined AP)."""
    present = positives > 0
    return ap[present].mean() if present.any() else torch.tensor(math.nan)


class ClassifierSystem(pl.LightningModule):
    """Trains :class:`CAMClassifier` with a multi-label soft-margin loss; validates mAP and F1.

    Args:
        weights: ``imagenet``, a local VGG16 state-dict path, or ``none`` (random, for tests/toys).
        width: channel multiplier of the VGG16 (1.0 = the real network).
        head_groups: groups of the 3x3 head conv (CAM used 2).
        optimizer: ``sgd`` (the paper-scale recipe) or ``adam`` (quick toy runs from random init).
        lr: base learning rate of the ImageNet-initialised trunk.
        new_layer_lr_mult: learning-rate multiplier of the new head and classifier layers.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: ``poly`` (per step), ``step`` (x0.1 at 2/3 of training) or ``constant``.
        poly_power: exponent of the poly schedule.
        batch_norm: VGG16-BN trunk, random init only (toy preset: trains from scratch in minutes).
        frozen_stages: keep the first N VGG16 blocks at their initial (ImageNet) weights; 4 makes a
            CPU step about three times cheaper (the real-photo preset on 2 cores).
        channels_last: train in NHWC memory format (oneDNN on CPUs and tensor cores on GPUs run it
            faster: a voc_mini step 1.36x in fp32, 1.50x under bf16 on a 2-core AVX512-BF16 CPU;
            same loss to float rounding). Checkpoints do not depend on it.
        num_classes: outputs, one per foreground class of the data's label set (VOC 20, COCO 80);
            training checks it against the data.
    """

    def __init__(
        self,
        weights: str = "imagenet",
        width: float = 1.0,
        head_groups: int = 1,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 1e-3,
        new_layer_lr_mult: float = 10.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: Literal["poly", "step", "constant"] = "poly",
        poly_power: float = 0.9,
        batch_norm: bool = False,
        frozen_stages: int = 0,
        channels_last: bool = True,
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = CAMClassifier(num_classes, weights=weights, width=width, head_groups=head_groups, batch_norm=batch_norm,
                                   frozen_stages=frozen_stages)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.val_metrics = MetricCollection(
            {
                "ap": MultilabelAveragePrecision(num_labels=num_classes, average=None),
                "f1": MultilabelF1Score(num_labels=num_classes, average="micro"),
                "positives": PositiveCounts(num_classes),
            }
        )

    def setup(self, stage: str) -> None:
        check_class_count(self, self.hparams.num_classes, foreground=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.multilabel_soft_margin_loss(self(batch["image"]), batch["multi_hot"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        targets = batch["multi_hot"].long()
        self.log("val/loss", F.multilabel_soft_margin_loss(logits, batch["multi_hot"]), sync_dist=True, batch_size=len(batch["id"]))
        self.val_metrics["ap"].update(logits.sigmoid(), targets)
        self.val_metrics["f1"].update(logits.sigmoid(), targets)
        self.val_metrics["positives"].update(targets)

    def on_validation_epoch_end(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No positive samples")
            ap = self.val_metrics["ap"].compute()
        self.log("val/mAP", mean_ap_of_present_classes(ap, self.val_metrics["positives"].compute()), prog_bar=True)
        self.log("val/F1", self.val_metrics["f1"].compute(), prog_bar=True)
        self.val_metrics.reset()

    def configure_optimizers(self):
        hp = self.hparams
        groups = [
            {"params": self.model.pretrained_parameters(), "lr": hp.lr},
            {"params": self.model.new_parameters(), "lr": hp.lr * hp.new_layer_lr_mult},
        ]
        groups = [group for group in groups if group["params"]]  # frozen_stages=5 leaves no trunk group
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"optimizer {hp.optimizer!r} unknown; choose from sgd, adam")
        total = int(self.trainer.estimated_stepping_batches)
        return per_step_schedule(optimizer, schedule_factor(hp.lr_schedule, total, hp.poly_power))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before the weights load: refuse another stage's checkpoint by name, not with a wall of keys.
        check_state_dict(checkpoint.get("state_dict"), self.state_dict(), "classifier", "wsss train-cls", "model.fc8.", "DeepLab segmenter")
