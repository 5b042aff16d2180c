"""Lightning plumbing shared by stages: the LightningCLI of the trainable stages (``train-cls``,
``train-seg``), checkpoint loading, and what the predict stages need under DDP (gathering
per-process counts, reporting from one process, an images/s progress bar)."""
from __future__ import annotations

import inspect
import re
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from pytorch_lightning.utilities import rank_zero_only

from wsss.errors import ConfigError, WeightsError
from wsss.io import atomic_path, ensure_output_dir, load_torch_file


# jsonargparse's unknown-key errors; the group named (or the unrecognised option's prefix) says
# which keys to list.
_UNKNOWN_KEY = re.compile(
    r"Group '(?P<group>[\w.]+)' does not accept option|Option '[\w.]+' is not accepted|unrecognized arguments: --(?P<option>[\w.]+)"
)
_NOT_CONFIG_KEYS = {"", "help", "config", "print_config", "print_shtab"}


class StageArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose unknown-key errors end with the keys valid at that level
    (jsonargparse names only the bad key, and its usage text buries the rest)."""

    def valid_keys(self, group: str = "") -> list[str]:
        """Config keys directly under ``group`` ("" = the top level)."""
        prefix = f"{group}." if group else ""
        return sorted({a.dest[len(prefix):].split(".")[0] for a in self._actions if a.dest.startswith(prefix)} - _NOT_CONFIG_KEYS)

    def error(self, message: str, ex: Exception | None = None):
        match = _UNKNOWN_KEY.search(message)
        if match is not None and self.exit_on_error:  # only the top-level parser: nested ones raise to it
            group = match["group"] or (match["option"] or "").rpartition(".")[0]
            keys = self.valid_keys(group)
            while not keys and group:  # a misspelt group (--modle.width): list the level above
                group = group.rpartition(".")[0]
                keys = self.valid_keys(group)
            if keys:
                message += f"\nvalid keys {f'in {group!r}' if group else 'at the top level'}: {', '.join(keys)}"
        super().error(message, ex)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reads and writes, made safe for local files.

    Reads (``--ckpt_path``, also ``last``) go through :func:`wsss.io.load_torch_file`:
    ``weights_only=True`` whatever torch's default, so a crafted checkpoint cannot run code, and a
    WeightsError naming the file. Writes go through :func:`wsss.io.atomic_path`: Lightning's own
    save stages the file in the system temp folder, from where moving it into place is a copy, not
    an atomic rename, when that folder is on another filesystem, and a SIGKILL leaves it there.
    Remote (``scheme://``) paths keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # the parent handles (or refuses) these
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path)


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


class StageCLI(LightningCLI):
    """LightningCLI with our defaults: best/last checkpoints in ``checkpoint_dir`` (``--checkpoint.*``),
    last.ckpt also every ``last_every_n_train_steps`` steps (``--last_checkpoint.every_n_train_steps``),
    CSV logs under ``runs/<log_name>``, ``--ckpt_path`` to resume (``last`` picks the last one);
    checkpoints are written atomically and read without unpickling code (:class:`SafeCheckpointIO`)."""

    def __init__(self, model_class, datamodule_class, *, args: list[str], prog: str, checkpoint_dir: str, monitor: str, log_name: str,
                 last_every_n_train_steps: int = 0, parse_only: bool = False, **kwargs: Any):
        self.parse_only = parse_only  # only check the options (``wsss run`` does before any stage)
        self._checkpoint_defaults = {
            "checkpoint.dirpath": checkpoint_dir,
            "checkpoint.filename": "best",
            "checkpoint.monitor": monitor,
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.enable_version_counter": False,  # re-runs overwrite best.ckpt, no best-v1.ckpt
            "last_checkpoint.every_n_train_steps": last_every_n_train_steps,
        }
        trainer_defaults = {
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": log_name}},
            "log_every_n_steps": 10,
        }
        super().__init__(
            model_class,
            datamodule_class,
            args=args,
            run=False,
            trainer_defaults=trainer_defaults,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": prog},
            parser_class=StageArgumentParser,
            **kwargs,
        )

    def instantiate_classes(self) -> None:
        if not self.parse_only:
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PeriodicLastCheckpoint, "last_checkpoint")
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        parser.set_defaults(self._checkpoint_defaults)
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume training from ('last' = the newest last.ckpt).")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own --trainer.plugins alone
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def fit(self) -> None:
        check_output_dirs(self.trainer)
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.get("ckpt_path"))
        callback = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and callback is not None:
            print(f"best checkpoint: {callback.best_model_path or '(none)'}  ({callback.monitor}={float(callback.best_model_score or float('nan')):.4f})")
            print(f"last checkpoint: {callback.last_model_path or '(none)'}")


def check_output_dirs(trainer) -> None:
    """Refuse unwritable checkpoint and log folders before training, not at the first save."""
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is not None:
            ensure_output_dir(callback.dirpath, "checkpoint folder")
    for logger in trainer.loggers:
        if logger.save_dir is not None:
            ensure_output_dir(logger.save_dir, "log folder")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, loaded with ``weights_only=True`` so no pickled code can run."""
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} is not a Lightning checkpoint")
    return checkpoint


def load_system_checkpoint(path: str | Path, system_class: type, required_key: str, what: str):
    """Rebuild a LightningModule from one of our checkpoints without unpickling code.

    ``required_key`` is a state-dict key only that kind of checkpoint has, so a checkpoint of the
    wrong stage is refused with a clear message instead of a wall of missing keys. The pretrained
    initialisation is skipped (``weights="none"``): every weight comes from the checkpoint.
    """
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or required_key not in state:
        raise WeightsError(f"{path} is not a {what} checkpoint (it has no '{required_key}')")
    accepted = inspect.signature(system_class.__init__).parameters
    kwargs = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted and k != "weights"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VGG16 weights='none'")
        system = system_class(weights="none", **kwargs)
    system.load_state_dict(state)
    return system.eval()


def predict_trainer(writer: BasePredictionWriter, accelerator: str, devices: int | str, strategy: str, progress: bool, **trainer_kwargs: Any) -> pl.Trainer:
    """A Trainer for a predict stage that writes through ``writer``: no logger, no checkpoints,
    an images/s bar when ``progress``.

    Strategies that run the loop in child processes and then end them (``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``) are refused: the counts a stage gathers after
    ``trainer.predict`` would end with them. ``ddp`` re-runs the command line in the other
    processes instead, and every process returns from ``predict``.
    """
    callbacks: list[pl.Callback] = [writer, ImagesPerSecondBar()] if progress else [writer]
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, callbacks=callbacks, **trainer_kwargs,
    )
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError(f"--strategy {strategy}: the predict loop would run in processes that end before the run's counts are gathered; use --strategy ddp")
    return trainer


def gather_objects(trainer: pl.Trainer, value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every process (``[value]`` in one process).

    Any picklable value. Every process must call it: right after ``trainer.predict`` returns is
    safe, a predict hook is not (a process with no batch runs none of them).
    """
    if trainer.world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def parse_devices(text: str) -> int | str:
    """A ``--devices`` value for the Trainer: a count (``"2"`` -> 2) or Lightning's own syntax
    (``auto``, ``-1``, ``"0,1"``) passed through."""
    return int(text) if text.isdigit() else text


def is_global_zero() -> bool:
    """True in the process that reports. Under DDP a stage's ``main`` goes on in every process
    after the Trainer returns (Lightning re-runs the command line in the others)."""
    return rank_zero_only.rank == 0


class ImagesPerSecondBar(TQDMProgressBar):
    """Prediction progress bar with images/s (batches/s alone hides the batch size). Counts the
    entries of each ``predict_step`` output, which our predict stages return one per image."""

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._images, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._images += len(outputs)
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            self.predict_progress_bar.set_postfix(img_s=f"{self._images / elapsed:.2f}")
