"""The system of stage 4: trains :class:`~wsss.models.deeplab.DeepLabLargeFOV` on label maps (``wsss train-seg``)."""
from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from wsss.classes import IGNORE_INDEX, NUM_LABELS
from wsss.metrics import SegmentationMetric
from wsss.models.deeplab import DeepLabLargeFOV
from wsss.segmentation import image_probabilities, nearest_labels
from wsss.systems.schedules import held_until, per_step_schedule, schedule_factor
from wsss.systems.state_dicts import check_class_count, check_state_dict

log = logging.getLogger(__name__)


class SegmenterSystem(pl.LightningModule):
    """Trains :class:`DeepLabLargeFOV` with cross-entropy (255 ignored) and scores val mIoU on whole
    images, with the geometry of ``predict-seg`` (:func:`wsss.segmentation.image_probabilities`).

    Args:
        weights: ``imagenet`` (DeepLab's init: VGG16 convs + decimated fc6/fc7), a local
            torchvision VGG16 state-dict path, ``classifier:/path/to.ckpt`` (trunk of our stage-1
            classifier) or ``none`` (random; toys and tests).
        width: channel multiplier (1.0 = the paper's network).
        num_classes: labels incl. background (21 for VOC, 81 for COCO); training checks it against the data.
        loss_at: ``image``: logits upsampled bilinearly to the crop and compared with every label
            pixel (default); ``logits``: labels subsampled with nearest neighbour to the 1/8 logit
            grid, as DeepLab's Caffe code did.
        lr: base learning rate; DeepLab's multipliers apply per group (biases x2, fc8 x10/x20).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (not on biases).
        poly_power: exponent of the per-step poly schedule (1 - step/max_steps) ** power.
        channels_last: train in NHWC memory format (faster convolutions with oneDNN on CPUs and on
            recent GPUs: a voc_mini step 1.16x in fp32, 1.41x under bf16 on a 2-core AVX512-BF16
            CPU; same loss to float rounding).
        batch_norm: VGG16-BN trunk (toy preset only; see :class:`DeepLabLargeFOV`).
        frozen_stages: keep the first N VGG16 blocks at their initial weights (cheaper CPU steps).
        new_layers_first: for this many first steps only the layers that start random (fc8, and
            fc6/fc7 without ImageNet ones to decimate) learn; the pretrained ones wait at lr 0.
    """

    def __init__(
        self,
        weights: str = "imagenet",
        width: float = 1.0,
        num_classes: int = NUM_LABELS,
        loss_at: Literal["image", "logits"] = "image",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        poly_power: float = 0.9,
        channels_last: bool = True,
        batch_norm: bool = False,
        frozen_stages: int = 0,
        new_layers_first: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = DeepLabLargeFOV(num_classes, weights=weights, width=width, batch_norm=batch_norm, frozen_stages=frozen_stages)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.val_metric = SegmentationMetric(num_classes, IGNORE_INDEX)

    def setup(self, stage: str) -> None:
        check_class_count(self, self.hparams.num_classes, foreground=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw 1/8-resolution logits (N, C, h, w)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy ignoring 255, at full crop resolution or on the logit grid (``loss_at``)."""
        if self.hparams.loss_at == "image":
            # Upsampling the logits scores every labelled pixel (thin parts and boundaries the
            # 1/8 grid would skip) and trains exactly what inference evaluates.
            logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=True)
        else:
            masks = nearest_labels(masks, tuple(logits.shape[-2:]))
        return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Full-size images (batch 1 in practice), the same code path as predict-seg at scale 1.
        for image, mask in zip(batch["image"], batch["mask"]):
            self.val_metric.update(image_probabilities(self, image).argmax(0), mask)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metric.scores()  # counts summed across DDP ranks before dividing
        self.log("val/mIoU", float(np.nan_to_num(scores.miou)), prog_bar=True, sync_dist=False)
        self.log("val/pixel_acc", float(np.nan_to_num(scores.pixel_accuracy)), sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            labels = getattr(self.trainer.datamodule, "labels", None)
            names = labels.names if labels is not None else [f"label {v}" for v in range(self.hparams.num_classes)]
            log.info("step %d validation:\n%s", self.global_step, scores.table(names))
        self.val_metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.model.optimizer_param_groups(hp.lr, hp.weight_decay)
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        poly = schedule_factor("poly", total, hp.poly_power)
        # Pretrained layers wait while the random ones settle: their first gradients, through random
        # fc6/fc7, shrank a fine-tuned ImageNet trunk's conv5 output 5x on real photos (val mIoU 4%).
        factors = [poly if group["name"].startswith("head_") else held_until(poly, hp.new_layers_first) for group in groups]
        return per_step_schedule(optimizer, factors)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before the weights load: refuse another stage's checkpoint by name, not with a wall of keys.
        check_state_dict(checkpoint.get("state_dict"), self.state_dict(), "DeepLab-LargeFOV segmenter", "wsss train-seg",
                         "model.classifier.", "stage-1 classifier")
