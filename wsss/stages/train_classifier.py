"""Stage 1: train the multi-label CAM classifier (``wsss train-cls``).

A LightningCLI over :class:`~wsss.systems.classifier.ClassifierSystem` (``model:``) and
:class:`~wsss.data.modules.ClassificationDataModule` (``data:``); see :mod:`wsss.trainers`.
"""
from __future__ import annotations

from wsss.data.modules import ClassificationDataModule
from wsss.systems.classifier import ClassifierSystem
from wsss.trainers import TrainedCheckpoints, TrainingConfig, TrainingStage, check_config, fit

STAGE = TrainingStage(
    prog="wsss train-cls", system_class=ClassifierSystem, datamodule_class=ClassificationDataModule,
    checkpoint_dir="checkpoints/classifier", monitor="val/mAP", log_name="classifier",
)


def train_classifier(config: TrainingConfig) -> TrainedCheckpoints:
    """Train the classifier. ``config``: the command line (``-c configs/classifier.yaml --model.width 0.5``)
    or the configuration as a dict of sections (``{"model": {...}, "data": {...}, "trainer": {...}}``)."""
    return fit(STAGE, config)


def check_classifier_config(config: TrainingConfig) -> None:
    """ConfigError listing the valid keys unless ``config`` is a valid ``train-cls`` configuration."""
    check_config(STAGE, config)


def main(argv: list[str]) -> int:
    """``wsss train-cls``: see ``--help``."""
    train_classifier(argv)
    return 0
