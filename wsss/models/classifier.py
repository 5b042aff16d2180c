"""The CAM-style VGG16 multi-label classifier (stage 1)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsss.classes import NUM_CLASSES
from wsss.errors import WeightsError
from wsss.models.vgg import freeze_stages, load_trunk_weights, load_vgg16_state_dict, scaled_channels, stage_indices, vgg16_features


class CAMClassifier(nn.Module):
    """VGG16 conv1_1..conv5_3 (pool5 and fc removed), 3x3 conv to 1024 + ReLU, GAP, linear.

    Args:
        num_classes: number of image-level classes (20 for VOC).
        weights: ``"imagenet"``, a local VGG16 state-dict path, or ``"none"`` (random).
        width: channel multiplier; 1.0 is VGG16, smaller values give a narrower network of the
            same topology (tests, toy runs). ImageNet weights need 1.0.
        head_groups: groups of the 3x3 head conv (CAM's original used 2).
        batch_norm: VGG16-BN trunk (random init only): trains from scratch in minutes on toy data.
        frozen_stages: the first N VGG16 blocks keep their initial weights (0 = train all). CAMs
            still take gradients through them (activation gradients need no weight gradients).
    """

    def __init__(
        self, num_classes: int = NUM_CLASSES, weights: str | Path = "imagenet", width: float = 1.0, head_groups: int = 1, batch_norm: bool = False,
        frozen_stages: int = 0,
    ):
        super().__init__()
        if batch_norm and str(weights).lower() != "none":
            raise WeightsError("batch_norm=True has no pretrained VGG16 weights here; use weights='none' or batch_norm=False")
        self.features = vgg16_features(width, batch_norm=batch_norm)
        # Smallest input side that leaves a conv5_3 position (each 2x2/2 max-pool halves the size).
        self.min_input_side = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.features)
        # Public names of the stage outputs the CAM stage hooks, mapped to module names.
        self.layer_aliases = {name: f"features.{index}" for name, index in stage_indices(batch_norm).items()}
        trunk_channels = scaled_channels(512, width)
        head_channels = scaled_channels(1024, width)
        self.head = nn.Sequential(
            nn.Conv2d(trunk_channels, head_channels, 3, padding=1, groups=head_groups), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Linear(head_channels, num_classes)
        nn.init.kaiming_normal_(self.head[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head[0].bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        state = load_vgg16_state_dict(weights)
        if state is not None:
            load_trunk_weights(self.features, state, source=str(weights))
        freeze_stages(self.features, frozen_stages, batch_norm)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map: conv5_3 after its ReLU, at 1/16 resolution."""
        return self.features(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) from trunk features: 3x3 conv + ReLU, global average pooling, linear."""
        head = self.head(features)
        # Pooling and the linear layer in float32 even under bf16 autocast: they cost nothing, and
        # bf16 logits (3 significant digits) would tie images in the ranking mAP is computed from.
        pooled = head.to(self.classifier.weight.dtype).mean(dim=(2, 3))
        with torch.autocast(features.device.type, enabled=False):
            return self.classifier(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters not initialised from ImageNet (trained at a higher learning rate)."""
        return [*self.head.parameters(), *self.classifier.parameters()]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters that are trained (frozen stages excluded)."""
        return [p for p in self.features.parameters() if p.requires_grad]
