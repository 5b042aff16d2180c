"""Callbacks of the training and predict Trainers."""
from __future__ import annotations

import time

from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar


class PeriodicLastCheckpoint(ModelCheckpoint):
    """Resume points between validations: last.ckpt rewritten every ``every_n_train_steps`` steps.

    A killed run then loses at most that many steps. The main ``--checkpoint`` callback writes
    best.ckpt and last.ckpt after each validation, which may be thousands of steps apart; its own
    ``every_n_train_steps`` is no substitute, as it would then write best.ckpt at train steps,
    scored by an earlier validation, instead of right after each validation.

    Args:
        dirpath: linked to ``--checkpoint.dirpath``.
        every_n_train_steps: optimiser steps between two saves of last.ckpt; 0 disables this callback.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=every_n_train_steps > 0,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)


class ImagesPerSecondBar(TQDMProgressBar):
    """Prediction progress bar with images/s (batches/s alone hides the batch size). Counts the
    entries of each ``predict_step`` output, which our predict modules return one per image."""

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._images, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._images += len(outputs)
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            self.predict_progress_bar.set_postfix(img_s=f"{self._images / elapsed:.2f}")
