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


def test_frozen_stages_keep_their_weights_and_cams_still_reach_them():
    torch.manual_seed(0)
    frozen = CAMClassifier(weights="none", width=0.125, frozen_stages=3)
    torch.manual_seed(0)
    free = CAMClassifier(weights="none", width=0.125)
    last_frozen = stage_indices()["stage3"]
    for name, parameter in frozen.features.named_parameters():
        assert parameter.requires_grad == (int(name.split(".")[0]) > last_frozen), name
    assert all(p.requires_grad for p in frozen.new_parameters())
    assert {id(p) for p in frozen.pretrained_parameters()} == {id(p) for p in frozen.features.parameters() if p.requires_grad}
    # One optimiser step moves only the trained layers.
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    optimizer = torch.optim.SGD([*frozen.pretrained_parameters(), *frozen.new_parameters()], lr=0.1)
    frozen(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    after = frozen.state_dict()
    assert torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert torch.equal(before["features.14.weight"], after["features.14.weight"])  # conv3_3, the last frozen conv
    assert not torch.equal(before["features.28.weight"], after["features.28.weight"])
    # Gradients with respect to activations, all CAMs need, do not depend on freezing.
    from wsss.cams import compute_cams

    images = torch.randn(1, 3, 64, 64)
    frozen.load_state_dict(free.state_dict())
    ours = compute_cams(frozen.eval(), images, [[3]], ["stage1", "stage3"])
    reference = compute_cams(free.eval(), images, [[3]], ["stage1", "stage3"])
    for layer in ("stage1", "stage3"):
        assert torch.allclose(ours[layer][0], reference[layer][0]) and ours[layer][0].abs().sum() > 0


def test_frozen_stages_out_of_range_is_a_config_error():
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match="frozen_stages must be in 0..5"):
        CAMClassifier(weights="none", width=0.125, frozen_stages=6)


def test_forward_features_is_the_trunk_and_forward_head_the_rest():
    """timm's split: forward_features gives the trunk's conv5_3 map, forward_head the logits from it."""
    torch.manual_seed(0)
    model = CAMClassifier(20, weights="none", width=0.125).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, 64, 4, 6)  # 512 * 0.125 channels at 1/16
        torch.testing.assert_close(features, model.features(images))
        torch.testing.assert_close(model.forward_head(features), model(images))
