"""How the stages build their Lightning Trainers.

- The two training stages (``train-cls``, ``train-seg``) are LightningCLIs over a system and a
  DataModule (:class:`TrainingCLI`), driven with argv by their commands and with a config dict by
  ``wsss run`` (:func:`fit`, :func:`check_config`). Configuration errors are ConfigErrors that
  list the valid keys, never a parser's exit.
- The stages that loop over images (``cams``, ``pseudo-labels``, ``predict-seg``) run a predict
  Trainer that writes through a prediction writer (:func:`predict_trainer`) and gather their
  per-process counts afterwards (:func:`gather_objects`).
"""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from pytorch_lightning.utilities import rank_zero_only

from wsss.errors import ConfigError
from wsss.io import ensure_output_dir
from wsss.systems.callbacks import ImagesPerSecondBar, PeriodicLastCheckpoint
from wsss.systems.checkpoints import SafeCheckpointIO
from wsss.systems.state_dicts import CheckpointMismatch

# A training stage's configuration: its command line (argv) or the parsed YAML as a dict of sections.
TrainingConfig = Sequence[str] | Mapping[str, Any]

# jsonargparse's unknown-key errors; the group named (or the unrecognised option's prefix) says
# which keys to list.
_UNKNOWN_KEY = re.compile(
    r"Group '(?P<group>[\w.]+)' does not accept option|Option '[\w.]+' is not accepted|unrecognized arguments: --(?P<option>[\w.]+)"
)
_NOT_CONFIG_KEYS = {"", "help", "config", "print_config", "print_shtab"}


class StageArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are ConfigErrors ending with the keys valid at that
    level (jsonargparse names only the bad key, and its usage text buries the rest)."""

    def valid_keys(self, group: str = "") -> list[str]:
        """Config keys directly under ``group`` ("" = the top level)."""
        prefix = f"{group}." if group else ""
        return sorted({a.dest[len(prefix):].split(".")[0] for a in self._actions if a.dest.startswith(prefix)} - _NOT_CONFIG_KEYS)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a nested parser: the top-level one reports
            return super().error(message, ex)
        match = _UNKNOWN_KEY.search(message)
        if match is not None:
            group = match["group"] or (match["option"] or "").rpartition(".")[0]
            keys = self.valid_keys(group)
            while not keys and group:  # a misspelt group (--modle.width): list the level above
                group = group.rpartition(".")[0]
                keys = self.valid_keys(group)
            if keys:
                message += f"\nvalid keys {f'in {group!r}' if group else 'at the top level'}: {', '.join(keys)}"
        raise ConfigError(message) from ex


@dataclass(frozen=True)
class TrainingStage:
    """What differs between the two training stages: the command, the LightningModule and
    DataModule whose ``__init__`` signatures are the ``model:`` and ``data:`` sections, and defaults."""

    prog: str
    system_class: type[pl.LightningModule]
    datamodule_class: type[pl.LightningDataModule]
    checkpoint_dir: str  # default --checkpoint.dirpath
    monitor: str  # the validation metric best.ckpt keeps the maximum of
    log_name: str  # CSV logs under runs/<log_name>
    last_every_n_train_steps: int = 0  # default --last_checkpoint.every_n_train_steps


@dataclass(frozen=True)
class TrainedCheckpoints:
    """What a training run left: best.ckpt (None without a validation) and last.ckpt."""

    best: Path | None
    last: Path | None



def score_text(score: Any) -> str:
    """A checkpoint callback's best score (a tensor, or None before any validation) to 4 places;
    a best score of 0 is a score, not "none"."""
    return "none" if score is None else f"{float(score):.4f}"

class TrainingCLI(LightningCLI):
    """LightningCLI with our defaults: best/last checkpoints in the stage's folder (``--checkpoint.*``),
    last.ckpt also every N steps (``--last_checkpoint.every_n_train_steps``), CSV logs under
    ``runs/<log_name>``, ``--ckpt_path`` to resume (``last`` picks the last one); checkpoints are
    written atomically and read without unpickling code (:class:`SafeCheckpointIO`).
    ``instantiate=False`` only checks the configuration.
    """

    def __init__(self, stage: TrainingStage, args: TrainingConfig, instantiate: bool = True):
        self.stage, self.instantiate = stage, instantiate
        trainer_defaults = {
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": stage.log_name}},
            "log_every_n_steps": 10,
        }
        with warnings.catch_warnings():  # args are given on purpose: `wsss COMMAND` or `wsss run` own sys.argv
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().__init__(
                stage.system_class, stage.datamodule_class, args=args if isinstance(args, Mapping) else list(args), run=False,
                trainer_defaults=trainer_defaults, seed_everything_default=0, save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": stage.prog}, parser_class=StageArgumentParser,
            )

    def before_instantiate_classes(self) -> None:
        if self.config.get("trainer.precision") is None:
            self.config["trainer.precision"] = default_precision(self.config.get("trainer.accelerator", "auto"))

    def instantiate_classes(self) -> None:
        if self.instantiate:
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PeriodicLastCheckpoint, "last_checkpoint")
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        parser.set_defaults({
            "checkpoint.dirpath": self.stage.checkpoint_dir,
            "checkpoint.filename": "best",
            "checkpoint.monitor": self.stage.monitor,
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.enable_version_counter": False,  # re-runs overwrite best.ckpt, no best-v1.ckpt
            "last_checkpoint.every_n_train_steps": self.stage.last_every_n_train_steps,
        })
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume training from ('last' = the newest last.ckpt).")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own --trainer.plugins alone
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def fit(self) -> TrainedCheckpoints:
        """Train (resuming from ``ckpt_path`` if given); the checkpoints are reported by one process."""
        check_output_dirs(self.trainer)
        ckpt_path = self.config.get("ckpt_path")
        try:
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        except CheckpointMismatch as exc:
            raise CheckpointMismatch(f"--ckpt_path {ckpt_path}: {exc}") from None
        callback = self.trainer.checkpoint_callback
        if callback is None:
            return TrainedCheckpoints(None, None)
        if self.trainer.is_global_zero:
            print(f"best checkpoint: {callback.best_model_path or '(none)'}  ({callback.monitor}={score_text(callback.best_model_score)})")
            print(f"last checkpoint: {callback.last_model_path or '(none)'}")
        return TrainedCheckpoints(Path(callback.best_model_path) if callback.best_model_path else None,
                                  Path(callback.last_model_path) if callback.last_model_path else None)


def default_precision(accelerator: object = "auto") -> str:
    """The Trainer precision used when a training config leaves ``trainer.precision`` unset: mixed
    precision wherever the hardware runs it natively, fp32 elsewhere.

    - CUDA: ``bf16-mixed`` where the GPU has bf16 (Ampere and later), else ``16-mixed``.
    - CPU: ``bf16-mixed`` where the CPU has bf16 instructions (AVX512-BF16 or AMX): on such a CPU a
      classifier step took 0.57x the fp32 time with the same loss (docs/benchmarks.md); without
      them bf16 is emulated and slower, so ``32-true``.
    - anything else (MPS, TPU, a custom accelerator object): ``32-true``.

    ``WSSS_DEFAULT_PRECISION`` in the environment (e.g. ``32-true``) replaces this choice, in every
    process of a run; the test suite pins fp32 that way so its results do not depend on the CPU.
    """
    pinned = os.environ.get("WSSS_DEFAULT_PRECISION", "").strip()
    if pinned:
        return pinned
    name = accelerator.lower() if isinstance(accelerator, str) else ""
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if name in ("auto", "cpu") and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 arithmetic instructions (Linux: the ``avx512_bf16`` or ``amx_bf16``
    flag in /proc/cpuinfo); False where that cannot be read."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def fit(stage: TrainingStage, config: TrainingConfig) -> TrainedCheckpoints:
    """Run a training stage on ``config`` (argv, or a dict of sections as in the stage YAML)."""
    return TrainingCLI(stage, config).fit()


def check_config(stage: TrainingStage, config: TrainingConfig) -> None:
    """ConfigError (listing the valid keys) unless ``config`` is a valid configuration of ``stage``;
    builds nothing."""
    TrainingCLI(stage, config, instantiate=False)


# Settings of a training config that change what it logs or where it writes, never the weights it
# trains: left out of ``wsss run``'s step hashes. (``data.num_workers`` is not among them: each
# worker draws its own augmentation stream, so another count trains another network.)
RESULT_NEUTRAL_TRAINING_KEYS = (
    "checkpoint", "last_checkpoint", "ckpt_path", "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.default_root_dir", "trainer.enable_checkpointing",
)


def resolved_config(stage: TrainingStage, config: TrainingConfig) -> dict[str, Any]:
    """``config`` parsed by the stage's parser, every default filled in, as plain data (what the
    stage will train with); ConfigError like :func:`check_config`."""
    cli = TrainingCLI(stage, config, instantiate=False)
    return json.loads(cli.parser.dump(cli.config, format="json", skip_check=True))


def check_output_dirs(trainer: pl.Trainer) -> None:
    """Refuse unwritable checkpoint and log folders before training, not at the first save."""
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is not None:
            ensure_output_dir(callback.dirpath, "checkpoint folder")
    for logger in trainer.loggers:
        if logger.save_dir is not None:
            ensure_output_dir(logger.save_dir, "log folder")


def predict_trainer(writer: BasePredictionWriter, accelerator: str, devices: int | str, strategy: str = "auto", progress: bool = True,
                    **trainer_kwargs: Any) -> pl.Trainer:
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
