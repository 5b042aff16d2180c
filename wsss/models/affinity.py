"""AffinityNet on the classifier's VGG16 trunk (PSA's design, Ahn & Kwak CVPR 2018): features of
stages 3, 4 and 5, each reduced by a 1x1 convolution, resized to one grid and mixed by a final 1x1
convolution into the embedding whose L1 distances give inter-pixel affinities
(:func:`wsss.affinity.pair_affinities`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.vgg import stage_indices

STAGES = ("stage3", "stage4", "stage5")
STAGE_STRIDES = {"stage3": 4, "stage4": 8, "stage5": 16}
HEAD_CHANNELS = {"stage3": 64, "stage4": 128, "stage5": 256}  # PSA's 64 + 128 + 256 = 448


class AffinityNet(nn.Module):
    """Embeddings (N, ``embedding``, H/stride, W/stride) of images (N, 3, H, W).

    ``trunk``: a VGG16 ``features`` Sequential (our classifier's, torchvision indexing), whose
    stage 3-5 outputs are read. ``frozen_trunk``: the trunk runs without gradients and its weights
    stay as given (the CPU preset; CAM-quality features are already in it). ``stride``: 4 or 8.
    """

    def __init__(self, trunk: nn.Sequential, batch_norm: bool = False, stride: int = 8, embedding: int = 448,
                 frozen_trunk: bool = True):
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"stride must be 4 or 8, got {stride}")
        self.trunk, self.stride, self.frozen_trunk = trunk, stride, frozen_trunk
        indices = stage_indices(batch_norm)
        self.stage_index = {indices[name]: name for name in STAGES}
        self.last_index = max(self.stage_index)
        channels = {name: next(m.out_channels for m in reversed(trunk[:indices[name] + 1]) if isinstance(m, nn.Conv2d)) for name in STAGES}
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Conv2d(channels[name], HEAD_CHANNELS[name], 1, bias=False),
                                                        nn.GroupNorm(4, HEAD_CHANNELS[name]), nn.ReLU(inplace=True)) for name in STAGES})
        self.mix = nn.Conv2d(sum(HEAD_CHANNELS.values()), embedding, 1, bias=False)
        for module in self.heads.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.mix.weight)
        if frozen_trunk:
            self.trunk.requires_grad_(False)
        # NHWC: oneDNN's and cuDNN's faster convolutions (x1.6 for the trunk on the 2-core CPU, bf16).
        self.to(memory_format=torch.channels_last)

    def stage_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trunk's stage 3-5 outputs."""
        found, x = {}, images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_trunk):
            for index, module in enumerate(self.trunk):
                x = module(x)
                if index in self.stage_index:
                    found[self.stage_index[index]] = x
                if index == self.last_index:
                    break
        return found

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (-(-images.shape[-2] // self.stride), -(-images.shape[-1] // self.stride))  # ceil: every pixel has a cell
        stages = self.stage_features(images)
        reduced = [F.interpolate(self.heads[name](stages[name]), size=size, mode="bilinear", align_corners=False) for name in STAGES]
        return self.mix(torch.cat(reduced, dim=1))

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if self.frozen_trunk:
            self.trunk.eval()  # a frozen trunk keeps its BatchNorm statistics (VGG16-BN toy trunks)
        return self
