"""VGG16 trunk shared by the classifier and DeepLab, and ImageNet weight loading.

The trunk is laid out exactly like torchvision's ``vgg16().features`` (same module
indices), so torchvision checkpoints load by key without remapping.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from wsss.errors import ConfigError, WeightsError
from wsss.formats.torch_files import load_torch_file

# Channels of the five VGG16 blocks at width 1.0; the number of 3x3 convs in each.
VGG16_BLOCK_CHANNELS = (64, 128, 256, 512, 512)
VGG16_BLOCK_DEPTHS = (2, 2, 3, 3, 3)

def stage_indices(batch_norm: bool = False) -> dict[str, int]:
    """Stage aliases: index of each block's last ReLU (after conv1_2 ... conv5_3) in the trunk of
    :func:`vgg16_features`: 3, 8, 15, 22, 29 as in ``vgg16().features``; with ``batch_norm``
    those of ``vgg16_bn().features``."""
    per_conv = 3 if batch_norm else 2  # conv (+ BN) + ReLU
    indices, position = {}, -1
    for block, depth in enumerate(VGG16_BLOCK_DEPTHS):
        position += depth * per_conv
        indices[f"stage{block + 1}"] = position
        position += 1  # the pool after the block
    return indices

WEIGHTS_HELP = (
    "Pass weights='imagenet' (downloads torchvision's VGG16_Weights.IMAGENET1K_V1, needs internet), "
    "a path to a local state dict (torchvision's vgg16-397923af.pth, or any file with "
    "'features.N.weight' keys), or 'none' for random initialisation."
)


def scaled_channels(channels: int, width: float) -> int:
    """Channel count of a layer in a network narrowed by ``width`` > 0 (at least 1)."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return max(1, int(round(channels * width)))


def vgg16_features(
    width: float = 1.0,
    pool_specs: list[tuple[int, int, int]] | None = None,
    block5_dilation: int = 1,
    batch_norm: bool = False,
) -> nn.Sequential:
    """The VGG16 conv trunk, torchvision indexing, with pool5 omitted.

    ``pool_specs`` gives (kernel, stride, padding) of pool1..pool4 (default 2/2/0, VGG's);
    DeepLab-LargeFOV passes its own and dilates block 5. ``batch_norm`` gives torchvision's
    ``vgg16_bn`` layout instead: not VGG16, but it trains from random weights in minutes, which
    is what the toy preset needs on a CPU (ImageNet weights require ``batch_norm=False``).
    """
    pool_specs = pool_specs or [(2, 2, 0)] * 4
    layers: list[nn.Module] = []
    in_ch = 3
    for block, (channels, depth) in enumerate(zip(VGG16_BLOCK_CHANNELS, VGG16_BLOCK_DEPTHS)):
        out_ch = scaled_channels(channels, width)
        dilation = block5_dilation if block == 4 else 1
        for _ in range(depth):
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
        if block < 4:
            kernel, stride, padding = pool_specs[block]
            layers.append(nn.MaxPool2d(kernel, stride, padding, ceil_mode=kernel == 3))
    trunk = nn.Sequential(*layers)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return trunk


def load_vgg16_state_dict(weights: str | Path) -> dict[str, torch.Tensor] | None:
    """Full torchvision-style VGG16 state dict (``features.*`` and ``classifier.*``).

    ``weights``: ``"imagenet"``, ``"none"`` (returns None and warns loudly) or a local file.
    Files are loaded with ``weights_only=True`` so no pickled code can run.
    """
    if str(weights).lower() == "none":
        warnings.warn(
            "VGG16 weights='none': the network starts from RANDOM weights. CAMs and segmentations "
            "from such a model are meaningless on real data; use this only for tests and toy runs.",
            stacklevel=2,
        )
        return None
    if str(weights).lower() == "imagenet":
        from torchvision.models import VGG16_Weights

        try:
            return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as exc:  # network errors come in many types
            raise WeightsError(
                f"could not download torchvision's ImageNet VGG16 weights ({type(exc).__name__}: {exc}). "
                f"Download {VGG16_Weights.IMAGENET1K_V1.url} on a machine with internet and pass its "
                "local path instead of 'imagenet'."
            ) from exc
    path = Path(weights)
    try:
        state = load_torch_file(path, "weights file")
    except WeightsError as exc:
        raise WeightsError(f"{exc}. {WEIGHTS_HELP}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(k.startswith("features.") for k in state):
        raise WeightsError(f"{path} is not a VGG16 state dict (no 'features.N.weight' keys). {WEIGHTS_HELP}")
    return state


def freeze_stages(trunk: nn.Sequential, num_stages: int, batch_norm: bool = False) -> None:
    """Stop training the first ``num_stages`` VGG16 blocks of ``trunk`` (0 = none, 5 = all).

    Their parameters get ``requires_grad=False``, so no gradient is computed for them and the
    backward pass stops at the first trainable block: on a CPU, freezing stages 1-4 makes a
    classifier step about three times cheaper. Gradients with respect to *activations* (what
    CAMs need) are unaffected. Frozen BatchNorm layers are not switched to eval mode.
    """
    if not 0 <= num_stages <= len(VGG16_BLOCK_DEPTHS):
        raise ConfigError(f"frozen_stages must be in 0..{len(VGG16_BLOCK_DEPTHS)}, got {num_stages}")
    if num_stages == 0:
        return
    last = stage_indices(batch_norm)[f"stage{num_stages}"]
    for index, module in enumerate(trunk):
        if index <= last:
            module.requires_grad_(False)


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries of ``state`` under ``prefix`` (e.g. ``"features."``) with the prefix removed."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def load_trunk_weights(trunk: nn.Sequential, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy VGG16 ``features.*`` weights into ``trunk``, with a clear error on a shape mismatch."""
    features = sub_state_dict(state, "features.")
    own = trunk.state_dict()
    mismatched = [k for k in own if k in features and features[k].shape != own[k].shape]
    if mismatched:
        raise WeightsError(
            f"{source}: VGG16 weights do not fit this network ({mismatched[0]}: "
            f"{tuple(features[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}); "
            "ImageNet weights need width=1.0."
        )
    missing, _ = trunk.load_state_dict(features, strict=False)
    if missing:
        raise WeightsError(f"{source}: VGG16 weights lack {len(missing)} trunk entries, e.g. {missing[0]}")
