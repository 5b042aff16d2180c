"""The CAM-style VGG16 classifier: shapes, gradients, torchvision compatibility, weights choices."""
from __future__ import annotations

import pytest
import torch
import torchvision

from wsss.errors import WeightsError
from wsss.models.classifier import CAMClassifier
from wsss.models.vgg import stage_indices


def test_output_shape_and_every_parameter_gets_a_gradient():
    model = CAMClassifier(weights="none", width=0.125)
    logits = model(torch.randn(2, 3, 64, 80))
    assert logits.shape == (2, 20)
    logits.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_torchvision_vgg16_features_state_dict_loads_without_missing_or_unexpected_keys():
    model = CAMClassifier(weights="none", width=1.0)
    reference = torchvision.models.vgg16().features.state_dict()
    result = model.features.load_state_dict(reference, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Same module indices as torchvision: every conv sits where torchvision has it.
    for index, module in enumerate(torchvision.models.vgg16().features[:30]):
        assert type(model.features[index]) is type(module)


def test_stage_aliases_are_the_relus_after_conv1_2_to_conv5_3():
    assert stage_indices() == {"stage1": 3, "stage2": 8, "stage3": 15, "stage4": 22, "stage5": 29}
    bn = torchvision.models.vgg16_bn().features
    for index in stage_indices(batch_norm=True).values():
        assert isinstance(bn[index], torch.nn.ReLU) and isinstance(bn[index - 2], torch.nn.Conv2d)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_stage_hooks_return_halving_resolutions(batch_norm):
    model = CAMClassifier(weights="none", width=0.125, batch_norm=batch_norm)
    modules = dict(model.named_modules())
    shapes = {}
    handles = [
        modules[target].register_forward_hook(lambda m, i, o, alias=alias: shapes.__setitem__(alias, tuple(o.shape[-2:])))
        for alias, target in model.layer_aliases.items()
    ]
    model(torch.randn(1, 3, 96, 128))
    for handle in handles:
        handle.remove()
    assert shapes == {"stage1": (96, 128), "stage2": (48, 64), "stage3": (24, 32), "stage4": (12, 16), "stage5": (6, 8)}


def test_local_weights_file_is_loaded(tmp_path):
    source = torchvision.models.vgg16()
    path = tmp_path / "vgg16.pth"
    torch.save(source.state_dict(), path)
    model = CAMClassifier(weights=str(path))
    assert torch.equal(model.features[28].weight, source.features[28].weight)


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        CAMClassifier(weights=str(tmp_path / "missing.pth"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a VGG16 state dict"):
        CAMClassifier(weights=str(tmp_path / "other.pth"))
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(WeightsError, match="width=1.0"):
        CAMClassifier(weights=str(tmp_path / "vgg.pth"), width=0.5)


def test_imagenet_download_failure_says_how_to_pass_a_local_file(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsError, match="local path"):
        CAMClassifier(weights="imagenet")


def test_random_weights_warn_loudly():
    with pytest.warns(UserWarning, match="RANDOM"):
        CAMClassifier(weights="none", width=0.125)
