"""Whether a state dict is a given system's: the check both systems' ``on_load_checkpoint`` run
(apart from :mod:`wsss.systems.checkpoints`, which loads the systems, so that neither imports the other)."""
from __future__ import annotations

from typing import Any

import torch

from wsss.errors import WeightsError


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
