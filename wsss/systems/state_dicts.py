"""What both systems check before they train or load: that a state dict is theirs (``on_load_checkpoint``)
and that their class count is the data's (``setup``). Apart from :mod:`wsss.systems.checkpoints`, which
loads the systems, so that neither imports the other."""
from __future__ import annotations

from typing import Any

import torch

from wsss.errors import ConfigError, WeightsError


class CheckpointMismatch(WeightsError):
    """A checkpoint of another stage (or another width): raised by a system's ``on_load_checkpoint``,
    whose caller adds which file or option it was."""


def check_state_dict(state: Any, expected: dict[str, torch.Tensor], what: str, command: str, other_prefix: str, other: str) -> None:
    """CheckpointMismatch unless ``state`` has exactly the keys and shapes of ``expected`` (a system's own
    state dict): another stage's checkpoint is named as such, not answered with a wall of keys.

    ``other_prefix`` is a key prefix only the other stage's checkpoints have, ``other`` its name.
    """
    if not isinstance(state, dict) or not state:
        raise CheckpointMismatch(f"not a Lightning checkpoint of a {what} (no 'state_dict' entry)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        looks_like = f" (it looks like a {other} checkpoint)" if any(k.startswith(other_prefix) for k in state) else ""
        raise CheckpointMismatch(
            f"not a {what} checkpoint{looks_like}: {len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); give a checkpoint written by `{command}`"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        key = wrong[0]
        raise CheckpointMismatch(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)} (a different width or class count?)")


def check_class_count(system: Any, num_classes: int, foreground: bool) -> None:
    """ConfigError unless ``num_classes`` (the system's ``model.num_classes``) is what its data module's
    label set needs: its foreground classes (the classifier) or all its labels (the segmenter).
    Nothing to check without a data module that knows its labels (a model used alone)."""
    trainer = getattr(system, "_trainer", None)
    labels = getattr(getattr(trainer, "datamodule", None), "labels", None)
    if labels is None:
        return
    needed = labels.num_labels - 1 if foreground else labels.num_labels
    if num_classes != needed:
        what = "foreground classes" if foreground else "labels, background included"
        raise ConfigError(f"model.num_classes is {num_classes}, but the data's label set {labels.name!r} has {needed} {what}: "
                          f"set model.num_classes: {needed}")
