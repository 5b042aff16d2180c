"""Checkpoints: Lightning's reads and writes made safe, and trained models loaded back.

Every read is ``torch.load(weights_only=True)`` (passed explicitly, so a crafted pickle cannot run
code whatever torch's default) and every error names the file.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from wsss.errors import WeightsError
from wsss.formats.torch_files import load_torch_file, read_checkpoint
from wsss.io import atomic_path
from wsss.models.classifier import CAMClassifier
from wsss.models.deeplab import DeepLabLargeFOV
from wsss.systems.classifier import ClassifierSystem
from wsss.systems.segmenter import SegmenterSystem
from wsss.systems.state_dicts import CheckpointMismatch


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reads and writes, made safe for local files.

    Reads (``--ckpt_path``, also ``last``) go through :func:`wsss.formats.torch_files.read_checkpoint`.
    Writes go through :func:`wsss.io.atomic_path`: Lightning's own save stages the file in the
    system temp folder, from where moving it into place is a copy, not an atomic rename, when that
    folder is on another filesystem, and a SIGKILL leaves it there. Remote (``scheme://``) paths
    keep Lightning's behaviour.
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


def load_system(system_class: type[pl.LightningModule], path: str | Path, **overrides: Any) -> pl.LightningModule:
    """A trained system from one of our checkpoints, in eval mode, on the CPU.

    The steps of Lightning's ``load_from_checkpoint``: the system is built from the stored
    hyper-parameters (those its ``__init__`` takes; ``overrides`` replace them, ``weights="none"``
    skips the pretrained initialisation since every weight comes from the checkpoint), its
    ``on_load_checkpoint`` refuses another stage's checkpoint by name, then the state dict loads
    strictly. ``load_from_checkpoint`` itself is not used: it first runs Lightning's checkpoint
    migrations, which need the ``pytorch-lightning_version`` entry, and so would refuse a plain
    ``{"state_dict", "hyper_parameters"}`` file (a conversion, a test fixture) that loads here; and
    its read errors do not name the file. The file is read by :func:`read_checkpoint`.
    """
    checkpoint = read_checkpoint(path)
    accepted = inspect.signature(system_class.__init__).parameters
    kwargs = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    kwargs.update(weights="none", **overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VGG16 weights='none'")
        system = system_class(**kwargs)
    try:
        system.on_load_checkpoint(checkpoint)
    except CheckpointMismatch as exc:
        raise CheckpointMismatch(f"{path}: {exc}") from None
    system.load_state_dict(checkpoint["state_dict"])
    return system.eval()


def load_classifier(path: str | Path) -> CAMClassifier:
    """The trained :class:`CAMClassifier` of a ``train-cls`` checkpoint, in eval mode, in the
    default memory format (``cams --channels-last`` chooses its own)."""
    return load_system(ClassifierSystem, path, channels_last=False).model


TORCHVISION_PREFIX = "torchvision:"


def load_torchvision_classifier(model: str, weights: str | Path, num_outputs: int | None = None, why: str = "") -> torch.nn.Module:
    """A torchvision classifier (``"torchvision:NAME"``, a name of ``torchvision.models.list_models``)
    with the weights of a state-dict file, in eval mode, on the CPU.

    The file holds ``model.state_dict()`` (also accepted: a dict holding it under ``"model"``, as
    torchvision's reference training scripts save, or under ``"state_dict"``). The number of outputs
    is read from the file's final layer (its last ``weight``: torchvision registers the head last)
    and the model built with that many; the weights then load strictly. ``num_outputs``: the count
    the caller needs, a WeightsError naming the file (and saying ``why``) otherwise.
    """
    import torchvision

    if not model.startswith(TORCHVISION_PREFIX):
        raise WeightsError(f"unknown model {model!r}; give torchvision:NAME, e.g. torchvision:resnet50")
    name = model[len(TORCHVISION_PREFIX):]
    known = torchvision.models.list_models(module=torchvision.models)  # the image classifiers only
    if name not in known:
        raise WeightsError(f"{name!r} is not a torchvision classification model; known names: {', '.join(known)}")
    state = load_torch_file(weights, "weights")
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{weights}: not a state dict (a dict of tensors, as torch.save(model.state_dict()) writes)")
    head = [key for key in state if key.endswith("weight")]
    if not head:
        raise WeightsError(f"{weights}: no weight tensors, so no final layer to read the number of outputs from")
    outputs = int(state[head[-1]].shape[0])
    if num_outputs is not None and outputs != num_outputs:
        raise WeightsError(f"{weights}: its final layer {head[-1]!r} has {outputs} outputs; {num_outputs} are needed"
                           + (f": {why}" if why else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # inception/googlenet: a notice about their default init
        network = torchvision.models.get_model(name, weights=None, num_classes=outputs)
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        shapes = f", {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}" if wrong else ""
        raise WeightsError(f"{weights}: not the weights of torchvision's {name} (with {outputs} outputs): {len(missing)} keys missing "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}){shapes}")
    network.load_state_dict(state)
    return network.eval()


def load_segmenter(path: str | Path) -> DeepLabLargeFOV:
    """The trained :class:`DeepLabLargeFOV` of a ``train-seg`` checkpoint, in eval mode, in the
    default memory format (``predict-seg --channels-last`` chooses its own)."""
    return load_system(SegmenterSystem, path, channels_last=False).model


def checkpoint_score(path: str | Path) -> float | None:
    """The ``best_model_score`` that ModelCheckpoint stored in a checkpoint (val mAP / val mIoU)."""
    for key, state in (read_checkpoint(path).get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


