"""The two affinity networks on the classifier's VGG16 trunk: :class:`AffinityNet` (PSA, Ahn & Kwak
CVPR 2018: an embedding whose L1 distances give inter-pixel affinities,
:func:`wsss.affinity.pair_affinities`) and :class:`BoundaryNet` (IRN, Ahn, Cho & Kwak CVPR 2019: a
class-boundary map whose maximum on the path between two cells gives their affinity,
:func:`wsss.affinity.boundary_affinities`). Both read the trunk's stage outputs without changing it
when it is frozen, as IRN detaches its backbone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.vgg import stage_indices

ALL_STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")
EMBEDDING_HEADS = {"stage3": 64, "stage4": 128, "stage5": 256}  # PSA's 64 + 128 + 256 = 448
BOUNDARY_CHANNELS = 32  # IRN's fc_edge1..5: 32 channels each
BOUNDARY_STRIDE = 4  # IRN's boundary map: stride 4, where its two finest stages are


def stage_channels(trunk: nn.Sequential, indices: dict[str, int], stages: tuple[str, ...]) -> dict[str, int]:
    """Output channels of each stage of ``stages`` (the last convolution up to its index)."""
    return {name: next(m.out_channels for m in reversed(trunk[:indices[name] + 1]) if isinstance(m, nn.Conv2d)) for name in stages}


class TrunkTaps(nn.Module):
    """The outputs of ``stages`` of a VGG16 ``features`` Sequential (torchvision indexing), with or
    without gradients into the trunk. A frozen trunk stays in eval mode (its BatchNorm statistics
    stay: VGG16-BN toy trunks)."""

    def __init__(self, trunk: nn.Sequential, batch_norm: bool, stages: tuple[str, ...], frozen: bool):
        super().__init__()
        self.trunk, self.frozen = trunk, frozen
        indices = stage_indices(batch_norm)
        self.channels = stage_channels(trunk, indices, stages)
        self.stage_at = {indices[name]: name for name in stages}
        if frozen:
            self.trunk.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        found, x = {}, images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for index, module in enumerate(self.trunk):
                x = module(x)
                if index in self.stage_at:
                    found[self.stage_at[index]] = x
                if len(found) == len(self.stage_at):
                    break
        return found

    def train(self, mode: bool = True) -> "TrunkTaps":
        super().train(mode)
        if self.frozen:
            self.trunk.eval()
        return self


def grid_size(images: torch.Tensor, stride: int) -> tuple[int, int]:
    """The affinity grid of ``images``: ceil(side / stride), so that every pixel has a cell."""
    return -(-images.shape[-2] // stride), -(-images.shape[-1] // stride)


class OnTrunk(nn.Module):
    """Heads on a :class:`TrunkTaps` (``self.taps``); ``trunk`` is the VGG16 it reads."""

    taps: TrunkTaps

    @property
    def trunk(self) -> nn.Sequential:
        return self.taps.trunk


class AffinityNet(OnTrunk):
    """PSA's embedding (N, ``embedding``, H/stride, W/stride) of images (N, 3, H, W): the trunk's
    stage 3-5 outputs, each reduced by a 1x1 convolution with GroupNorm and ReLU, resized to the
    grid and mixed by a 1x1 convolution. ``stride``: 4 or 8 (PSA: 8)."""

    def __init__(self, trunk: nn.Sequential, batch_norm: bool = False, stride: int = 8, embedding: int = 448,
                 frozen_trunk: bool = True):
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"stride must be 4 or 8, got {stride}")
        self.stride, self.stages = stride, tuple(EMBEDDING_HEADS)
        self.taps = TrunkTaps(trunk, batch_norm, self.stages, frozen_trunk)
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Conv2d(self.taps.channels[name], width, 1, bias=False),
                                                        nn.GroupNorm(4, width), nn.ReLU(inplace=True)) for name, width in EMBEDDING_HEADS.items()})
        self.mix = nn.Conv2d(sum(EMBEDDING_HEADS.values()), embedding, 1, bias=False)
        for module in self.heads.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.mix.weight)
        # NHWC: oneDNN's and cuDNN's faster convolutions.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = grid_size(images, self.stride)
        stages = self.taps(images)
        reduced = [F.interpolate(self.heads[name](stages[name]), size=size, mode="bilinear", align_corners=False) for name in self.stages]
        return self.mix(torch.cat(reduced, dim=1))


class BoundaryNet(OnTrunk):
    """IRN's class-boundary branch on VGG16: logits (N, 1, H/4, W/4) of images (N, 3, H, W).

    Every one of the five stages is reduced to 32 channels by a 1x1 convolution and GroupNorm(4),
    brought to the stride-4 grid (stages 1-2, finer than it, by max pooling as VGG itself pools;
    stages 4-5 by bilinear upsampling after GroupNorm, as IRN's fc_edge3-5), then ReLU; a final
    1x1 convolution with bias mixes the 160 channels into one logit (IRN's fc_edge6). PyTorch's
    default initialisation, as IRN's."""

    stride = BOUNDARY_STRIDE

    def __init__(self, trunk: nn.Sequential, batch_norm: bool = False, frozen_trunk: bool = True):
        super().__init__()
        self.stages = ALL_STAGES
        self.taps = TrunkTaps(trunk, batch_norm, self.stages, frozen_trunk)
        self.reduce = nn.ModuleDict({name: nn.Sequential(nn.Conv2d(self.taps.channels[name], BOUNDARY_CHANNELS, 1, bias=False),
                                                         nn.GroupNorm(4, BOUNDARY_CHANNELS)) for name in self.stages})
        self.mix = nn.Conv2d(BOUNDARY_CHANNELS * len(self.stages), 1, 1, bias=True)
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = grid_size(images, self.stride)
        stages = self.taps(images)
        branches = []
        for name in self.stages:
            x = stages[name]
            if x.shape[-2] > size[0] or x.shape[-1] > size[1]:
                x = self.reduce[name](F.adaptive_max_pool2d(x, size))
            else:
                x = F.interpolate(self.reduce[name](x), size=size, mode="bilinear", align_corners=False)
            branches.append(F.relu(x))
        return self.mix(torch.cat(branches, dim=1))


def flip_averaged_boundary(model: BoundaryNet, image: torch.Tensor) -> torch.Tensor:
    """IRN's inference boundary map (h, w) of one image (3, H, W): the sigmoid of the mean of the
    logits of the image and of its mirror image (mirrored back)."""
    logits = model(torch.stack([image, image.flip(-1)]))[:, 0]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)
