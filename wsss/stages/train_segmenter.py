"""Stage 4: train DeepLab-LargeFOV on pseudo-labels or GT masks (``wsss train-seg``).

A LightningCLI over :class:`~wsss.systems.segmenter.SegmenterSystem` (``model:``) and
:class:`~wsss.data.modules.SegmentationDataModule` (``data:``); see :mod:`wsss.trainers`.
"""
from __future__ import annotations

from wsss.data.modules import SegmentationDataModule
from wsss.systems.segmenter import SegmenterSystem
from wsss.trainers import TrainedCheckpoints, TrainingConfig, TrainingStage, check_config, fit

STAGE = TrainingStage(
    prog="wsss train-seg", system_class=SegmenterSystem, datamodule_class=SegmentationDataModule,
    checkpoint_dir="checkpoints/segmenter", monitor="val/mIoU", log_name="segmenter",
    last_every_n_train_steps=500,  # resume points between validations (every 2,000 steps at paper scale)
)


def train_segmenter(config: TrainingConfig) -> TrainedCheckpoints:
    """Train the segmenter. ``config``: the command line (``-c configs/segmenter.yaml --data.train_labels DIR``)
    or the configuration as a dict of sections (``{"model": {...}, "data": {...}, "trainer": {...}}``)."""
    return fit(STAGE, config)


def check_segmenter_config(config: TrainingConfig) -> None:
    """ConfigError listing the valid keys unless ``config`` is a valid ``train-seg`` configuration."""
    check_config(STAGE, config)


def main(argv: list[str]) -> int:
    """``wsss train-seg``: see ``--help``."""
    train_segmenter(argv)
    return 0
