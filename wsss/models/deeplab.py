"""DeepLab-LargeFOV (Chen et al., ICLR 2015) on VGG16: the stage-3 segmenter.

Layout (as the released Caffe prototxt):
conv1..conv5 of VGG16; pool1-pool3 3x3/2 pad 1; pool4 3x3/1 pad 1; conv5_x dilation 2;
pool5 3x3/1 pad 1 max then 3x3/1 pad 1 average (``pool5a``); fc6 3x3 dilation 12 -> 1024,
ReLU, dropout 0.5; fc7 1x1 -> 1024, ReLU, dropout 0.5; fc8 1x1 -> classes. Output stride 8.

Initialisation (``weights``):
- ``"imagenet"`` or a local torchvision-style VGG16 state dict: conv layers copied, fc6/fc7
  decimated from ImageNet fc6/fc7 (:func:`decimate_vgg_fc`), fc8 ~ N(0, 0.01). A file with conv
  layers only (no ``classifier.*``) leaves fc6/fc7 random (Kaiming) and says so in the log.
- ``"classifier:/path/to.ckpt"``: the conv trunk from our stage-1 classifier's Lightning
  checkpoint (:func:`backbone_from_classifier_checkpoint`); fc6/fc7 random (Kaiming), fc8 ~ N(0, 0.01).
- ``"none"``: everything random (tests and toy runs only; warns loudly).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from wsss.classes import NUM_LABELS
from wsss.errors import WeightsError
from wsss.formats.torch_files import load_torch_file
from wsss.models.vgg import freeze_stages, load_trunk_weights, load_vgg16_state_dict, scaled_channels, vgg16_features

log = logging.getLogger(__name__)

# (kernel, stride, padding) of pool1..pool4: three stride-2 pools give output stride 8.
DEEPLAB_POOL_SPECS = [(3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1)]
CONV5_DILATION = 2
FC6_DILATION = 12  # the "large field of view": 3x3 taps 12 px apart at stride 8
OUTPUT_STRIDE = 8

# DeepLab decimates ImageNet fc6/fc7: every 4th unit (4096 -> 1024) and, for fc6, the taps at
# rows/cols 0, 3, 6 of the 7x7 grid (a 3x3 kernel spanning the same extent).
FC_RANDOM_STD = 0.01  # random fc6/fc7 under a pretrained plain trunk (see _small_random_fc)
VGG_FC_PREFIX = "classifier."  # torchvision's fc6/fc7/fc8 keys
FC_UNIT_STRIDE = 4
FC6_TAPS = (0, 3, 6)
VGG_FC6_GRID = 7

# Prefix of the CAMClassifier trunk inside the stage-1 LightningModule's state dict.
CLASSIFIER_TRUNK_PREFIX = "model.features."
CLASSIFIER_WEIGHTS_SCHEME = "classifier:"

# Field convention (DeepLab's Caffe solver): per-group multipliers of the base learning rate and
# of the weight decay. Biases get twice the lr and no decay; the new classifier fc8 gets x10/x20.
LR_MULTIPLIERS: dict[str, float] = {"weights": 1.0, "biases": 2.0, "head_weights": 10.0, "head_biases": 20.0}
WEIGHT_DECAY_MULTIPLIERS: dict[str, float] = {"weights": 1.0, "biases": 0.0, "head_weights": 1.0, "head_biases": 0.0}


def decimate_vgg_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepLab's fc6/fc7 conv weights from a torchvision-style VGG16 state dict.

    ``classifier.0.weight`` (4096, 512*7*7) is viewed as (4096, 512, 7, 7) (torchvision flattens
    C, H, W in that order); every 4th output unit and the taps at 0, 3, 6 in both spatial dims are
    kept -> (1024, 512, 3, 3). ``classifier.3.weight`` (4096, 4096) keeps every 4th output and
    every 4th input unit -> (1024, 1024, 1, 1). Biases keep every 4th unit. Works for any VGG
    width (a narrow test network's 512/4096 are simply smaller).

    Returns a dict with keys ``fc6.weight``, ``fc6.bias``, ``fc7.weight``, ``fc7.bias``.
    """
    needed = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
    missing = [key for key in needed if key not in state]
    if missing:
        raise WeightsError(
            f"VGG16 state dict lacks {missing[0]}: DeepLab initialises fc6/fc7 from ImageNet fc6/fc7, "
            "so the file must be a full torchvision VGG16 state dict (features.* and classifier.*)."
        )
    fc6_full = state["classifier.0.weight"]
    grid = VGG_FC6_GRID * VGG_FC6_GRID
    if fc6_full.dim() != 2 or fc6_full.shape[1] % grid:
        raise WeightsError(f"classifier.0.weight has shape {tuple(fc6_full.shape)}; expected (units, channels*7*7)")
    taps = torch.tensor(FC6_TAPS)
    fc6 = fc6_full.reshape(fc6_full.shape[0], fc6_full.shape[1] // grid, VGG_FC6_GRID, VGG_FC6_GRID)
    fc6 = fc6[::FC_UNIT_STRIDE].index_select(2, taps).index_select(3, taps)
    fc7 = state["classifier.3.weight"][::FC_UNIT_STRIDE, ::FC_UNIT_STRIDE]
    return {
        "fc6.weight": fc6.contiguous().clone(),
        "fc6.bias": state["classifier.0.bias"][::FC_UNIT_STRIDE].clone(),
        "fc7.weight": fc7.reshape(*fc7.shape, 1, 1).contiguous().clone(),
        "fc7.bias": state["classifier.3.bias"][::FC_UNIT_STRIDE].clone(),
    }


def backbone_from_classifier_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The VGG16 trunk of a stage-1 classifier Lightning checkpoint, torchvision-style keys.

    The checkpoint's ``state_dict`` holds the CAMClassifier under ``model.`` (so the trunk is
    ``model.features.N.*``); the result has keys ``features.N.*`` ready for ``load_trunk_weights``.
    Loaded with ``weights_only=True``: no pickled code runs.
    """
    checkpoint = load_torch_file(path, "classifier checkpoint")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    trunk = {"features." + key[len(CLASSIFIER_TRUNK_PREFIX):]: value
             for key, value in state.items() if key.startswith(CLASSIFIER_TRUNK_PREFIX)}
    if not trunk:
        example = next(iter(state), "<empty>")
        raise WeightsError(
            f"{path} holds no classifier trunk: no '{CLASSIFIER_TRUNK_PREFIX}N.weight' keys "
            f"(first key: {example!r}); expected a checkpoint of the stage-1 classifier."
        )
    return trunk


class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV segmenter on VGG16; returns logits at 1/8 resolution (ceil arithmetic).

    Args:
        num_classes: segmentation labels incl. background (21 for VOC).
        weights: ``"imagenet"``, a local torchvision VGG16 state-dict path,
            ``"classifier:/path/to.ckpt"`` (stage-1 classifier trunk) or ``"none"``.
        width: channel multiplier (1.0 is the paper's network; smaller for tests/toy runs).
            ImageNet weights need 1.0; a local file or checkpoint must match ``width``.
        batch_norm: VGG16-BN trunk (not the paper's network): only from random weights or from a
            stage-1 classifier trained with ``batch_norm`` (the toy preset, where no ImageNet exists).
        frozen_stages: the first N VGG16 blocks keep their initial weights (0 = train all).
    """

    def __init__(self, num_classes: int = NUM_LABELS, weights: str | Path = "imagenet", width: float = 1.0, batch_norm: bool = False,
                 frozen_stages: int = 0):
        super().__init__()
        if str(weights).lower() == "imagenet" and width != 1.0:
            raise WeightsError(f"ImageNet VGG16 weights need width=1.0 (got width={width}); use weights='none'.")
        if batch_norm and not (str(weights).lower() == "none" or str(weights).startswith(CLASSIFIER_WEIGHTS_SCHEME)):
            raise WeightsError(f"batch_norm=True has no VGG16 weights to start from ({weights!r}); "
                               f"use weights='none' or '{CLASSIFIER_WEIGHTS_SCHEME}<checkpoint of a batch_norm classifier>'")
        self.batch_norm = batch_norm
        self.features = vgg16_features(width, DEEPLAB_POOL_SPECS, block5_dilation=CONV5_DILATION, batch_norm=batch_norm)
        trunk_channels = scaled_channels(512, width)
        fc_channels = scaled_channels(1024, width)
        self.pool5 = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        # Caffe's AVE pooling divides by the window size incl. padding, i.e. count_include_pad=True.
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
        self.fc6 = nn.Conv2d(trunk_channels, fc_channels, 3, padding=FC6_DILATION, dilation=FC6_DILATION)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.fc8 = nn.Conv2d(fc_channels, num_classes, 1)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc8.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        self.new_layers: tuple[str, ...] = ("fc8",)  # layers that start random under pretrained ones
        _initialise_from(self, weights)
        freeze_stages(self.features, frozen_stages, batch_norm)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map: conv5_3 (dilated) after its ReLU, at 1/8 resolution."""
        return self.features(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from trunk features: pool5 (max, then average), fc6 (dilation 12), fc7, fc8."""
        x = self.pool5a(self.pool5(features))
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.fc8(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes, h, w), h = ceil-pooled H/8 (321 -> 41); upsample for the loss."""
        return self.forward_head(self.forward_features(images))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split as DeepLab's Caffe solver treats them (see ``LR_MULTIPLIERS``).

        ``head_weights``/``head_biases``: the layers that start random under pretrained ones
        (``new_layers``: fc8, and fc6/fc7 when the weights have none to decimate); ``weights``/``biases``:
        the rest. Every trained parameter is in exactly one group; frozen ones (``frozen_stages``) in none.
        """
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in LR_MULTIPLIERS}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            head = "head_" if name.split(".")[0] in self.new_layers else ""
            kind = "biases" if name.endswith("bias") else "weights"
            groups[head + kind].append(param)
        return groups

    def optimizer_param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """``torch.optim`` param groups with the field's lr and weight-decay multipliers applied.

        A ``LambdaLR`` poly schedule scales each group's own initial lr, so the ratios persist.
        """
        return [
            {"params": params, "lr": lr * LR_MULTIPLIERS[name],
             "weight_decay": weight_decay * WEIGHT_DECAY_MULTIPLIERS[name], "name": name}
            for name, params in self.param_groups().items()
        ]


def _initialise_from(model: DeepLabLargeFOV, weights: str | Path) -> None:
    """Copy the pretrained weights ``weights`` names into ``model`` (see the module docstring)."""
    text = str(weights)
    if text.startswith(CLASSIFIER_WEIGHTS_SCHEME):
        path = text[len(CLASSIFIER_WEIGHTS_SCHEME):]
        trunk = backbone_from_classifier_checkpoint(path)
        load_trunk_weights(model.features, trunk, source=f"classifier checkpoint {path}")
        _small_random_fc(model)
        return
    state = load_vgg16_state_dict(weights)
    if state is None:
        return
    load_trunk_weights(model.features, state, source=text)
    if not any(key.startswith(VGG_FC_PREFIX) for key in state):
        # Conv-only VGG16 files (Keras/ONNX conversions, feature extractors) have no fc6/fc7 to
        # decimate: the trunk is still ImageNet's, fc6/fc7 keep their random initialisation.
        log.warning("%s has no ImageNet fc6/fc7 ('%s*' keys): DeepLab's fc6/fc7 are initialised randomly", text, VGG_FC_PREFIX)
        _small_random_fc(model)
        return
    fc = decimate_vgg_fc(state)
    own = model.state_dict()
    for key, value in fc.items():
        if value.shape != own[key].shape:
            raise WeightsError(
                f"{text}: decimated ImageNet {key} has shape {tuple(value.shape)} but this network needs "
                f"{tuple(own[key].shape)}; ImageNet weights need width=1.0."
            )
    model.load_state_dict(fc, strict=False)


def _small_random_fc(model: DeepLabLargeFOV) -> None:
    """Random fc6/fc7 under a pretrained plain VGG16 trunk: N(0, 0.01), as DeepLab initialises the
    layers it adds. The trunk's conv5 activations are far from unit scale (up to ~200 with ImageNet
    weights), so the fan-based (Kaiming) start, right for unit-scale inputs, gave logits in the
    hundreds and a loss that turned to NaN within 20 steps on real photos. A batch-norm trunk's
    outputs are unit-scale: Kaiming stays."""
    model.new_layers = ("fc6", "fc7", "fc8")
    if model.batch_norm:
        return
    for conv in (model.fc6, model.fc7):
        nn.init.normal_(conv.weight, mean=0.0, std=FC_RANDOM_STD)
        nn.init.zeros_(conv.bias)
