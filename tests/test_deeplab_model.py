"""DeepLab-LargeFOV model: layout, output size, parameter count, initialisation paths."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wsss.errors import WeightsError
from wsss.models.deeplab import (
    LR_MULTIPLIERS,
    DeepLabLargeFOV,
    backbone_from_classifier_checkpoint,
    decimate_vgg_fc,
)
from wsss.models.vgg import vgg16_features

NARROW = 0.125  # 8..64 trunk channels, 128 fc channels: fast on CPU


def narrow(**kwargs) -> DeepLabLargeFOV:
    with pytest.warns(UserWarning, match="RANDOM"):
        return DeepLabLargeFOV(weights="none", width=NARROW, **kwargs)


@pytest.fixture(scope="module")
def full_model() -> DeepLabLargeFOV:
    with pytest.warns(UserWarning):
        return DeepLabLargeFOV(weights="none", width=1.0)


def test_parameter_count_at_full_width(full_model):
    # VGG16 conv config written out independently of wsss.models.vgg.
    trunk = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    expected, c_in = 0, 3
    for c_out in trunk:
        expected += c_in * c_out * 9 + c_out
        c_in = c_out
    expected += 512 * 1024 * 9 + 1024  # fc6 3x3
    expected += 1024 * 1024 + 1024  # fc7 1x1
    expected += 1024 * 21 + 21  # fc8 1x1
    measured = sum(p.numel() for p in full_model.parameters())
    assert measured == expected == 20_505_429
    assert full_model.fc8.out_channels == 21


def test_fc8_init_std_and_zero_bias(full_model):
    std = full_model.fc8.weight.std().item()
    assert 0.0095 < std < 0.0105
    assert abs(full_model.fc8.weight.mean().item()) < 0.001
    assert torch.count_nonzero(full_model.fc8.bias) == 0


def _pooled(n: int, kernel: int, stride: int, pad: int) -> int:
    # Caffe / ceil_mode arithmetic: ceil, then drop a window that would start in the padding.
    out = math.ceil((n + 2 * pad - kernel) / stride) + 1
    if (out - 1) * stride >= n + pad:
        out -= 1
    return out


def _expected_logits_size(n: int) -> int:
    for _ in range(3):  # pool1..pool3: 3x3 stride 2 pad 1; pool4, pool5, pool5a keep the size
        n = _pooled(n, 3, 2, 1)
    return n


def test_pooling_arithmetic_pins():
    assert [_expected_logits_size(n) for n in (321, 513, 320, 1)] == [41, 65, 41, 1]


@pytest.mark.parametrize("height,width", [(321, 321), (320, 320), (513, 513), (97, 64), (33, 40), (1, 7)])
def test_output_size(height, width):
    model = narrow().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, height, width))
    assert out.shape == (1, 21, _expected_logits_size(height), _expected_logits_size(width))


def test_layer_layout_dilations_and_pools():
    model = narrow()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for conv in convs[:10]:
        assert conv.dilation == (1, 1) and conv.padding == (1, 1)
    for conv in convs[10:]:  # conv5_1..conv5_3
        assert conv.dilation == (2, 2) and conv.padding == (2, 2)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)]
    assert model.fc6.kernel_size == (3, 3) and model.fc6.dilation == (12, 12) and model.fc6.padding == (12, 12)
    assert model.fc7.kernel_size == (1, 1) and model.fc8.kernel_size == (1, 1)
    assert (model.pool5.kernel_size, model.pool5.stride, model.pool5.padding) == (3, 1, 1)
    assert isinstance(model.pool5a, nn.AvgPool2d) and model.pool5a.kernel_size == 3 and model.pool5a.stride == 1
    # trunk keys are torchvision's vgg16().features indices
    assert "28.weight" in model.features.state_dict() and "30.weight" not in model.features.state_dict()


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = narrow().train()
    out = model(torch.randn(2, 3, 49, 49))
    target = torch.randint(0, 21, out.shape[:1] + out.shape[2:])
    nn.functional.cross_entropy(out, target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    model = narrow()
    x = torch.randn(1, 3, 41, 41)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def _fake_vgg_state(width: float) -> dict[str, torch.Tensor]:
    """A torchvision-style VGG16 state dict of a network narrowed by ``width``, random values."""
    state = {f"features.{k}": torch.randn_like(v) for k, v in vgg16_features(width).state_dict().items()}
    c5, units = int(512 * width), int(4096 * width)
    state["classifier.0.weight"] = torch.randn(units, c5 * 49)
    state["classifier.0.bias"] = torch.randn(units)
    state["classifier.3.weight"] = torch.randn(units, units)
    state["classifier.3.bias"] = torch.randn(units)
    state["classifier.6.weight"] = torch.randn(1000, units)
    state["classifier.6.bias"] = torch.randn(1000)
    return state


def test_imagenet_style_file_init_decimates_fc_and_copies_trunk(tmp_path):
    torch.manual_seed(1)
    state = _fake_vgg_state(NARROW)
    path = tmp_path / "vgg16_fake.pth"
    torch.save(state, path)
    model = DeepLabLargeFOV(weights=str(path), width=NARROW)

    for key, value in model.features.state_dict().items():
        assert torch.equal(value, state[f"features.{key}"]), key

    # fc6: hand-indexed over the flat (C*7*7) ImageNet layout, unit 4*o, taps (0,3,6)x(0,3,6).
    w0 = state["classifier.0.weight"].tolist()
    fc6 = model.fc6.weight.detach().tolist()
    n_out, n_in = len(fc6), len(fc6[0])
    assert (n_out, n_in) == (128, 64)
    for o in range(n_out):
        row = w0[4 * o]
        for c in range(n_in):
            for i, r in enumerate((0, 3, 6)):
                for j, s in enumerate((0, 3, 6)):
                    assert fc6[o][c][i][j] == row[c * 49 + r * 7 + s]
    b0 = state["classifier.0.bias"]
    assert torch.equal(model.fc6.bias.detach(), torch.stack([b0[4 * o] for o in range(n_out)]))

    w3 = state["classifier.3.weight"]
    fc7 = model.fc7.weight.detach()
    assert fc7.shape == (128, 128, 1, 1)
    for o in range(128):
        assert torch.equal(fc7[o, :, 0, 0], torch.stack([w3[4 * o, 4 * i] for i in range(128)]))
    b3 = state["classifier.3.bias"]
    assert torch.equal(model.fc7.bias.detach(), torch.stack([b3[4 * o] for o in range(128)]))

    assert torch.count_nonzero(model.fc8.bias) == 0


def test_decimate_vgg_fc_full_size_shapes():
    state = {
        "classifier.0.weight": torch.zeros(4096, 25088),
        "classifier.0.bias": torch.arange(4096.0),
        "classifier.3.weight": torch.zeros(4096, 4096),
        "classifier.3.bias": torch.arange(4096.0),
    }
    fc = decimate_vgg_fc(state)
    assert fc["fc6.weight"].shape == (1024, 512, 3, 3)
    assert fc["fc7.weight"].shape == (1024, 1024, 1, 1)
    assert fc["fc6.bias"][:3].tolist() == [0.0, 4.0, 8.0] and fc["fc7.bias"][-1].item() == 4092.0


def test_decimate_vgg_fc_needs_classifier_keys():
    with pytest.raises(WeightsError, match="classifier.0"):
        decimate_vgg_fc({"features.0.weight": torch.zeros(1)})


def test_width_mismatch_is_refused(tmp_path):
    torch.save(_fake_vgg_state(0.25), tmp_path / "wide.pth")
    with pytest.raises(WeightsError):
        DeepLabLargeFOV(weights=str(tmp_path / "wide.pth"), width=NARROW)


def test_imagenet_refused_below_full_width_before_download():
    with pytest.raises(WeightsError, match="width=1.0"):
        DeepLabLargeFOV(weights="imagenet", width=0.5)


def _classifier_trunk_state(width: float) -> dict[str, torch.Tensor]:
    return {f"model.features.{k}": torch.randn_like(v) for k, v in vgg16_features(width).state_dict().items()}


def test_classifier_checkpoint_init(tmp_path):
    torch.manual_seed(2)
    trunk = _classifier_trunk_state(NARROW)
    head = {"model.head.0.weight": torch.randn(128, 64, 3, 3), "model.classifier.weight": torch.randn(20, 128)}
    state = {**trunk, **head}
    ckpt = {"state_dict": state, "epoch": 3, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {"lr": 0.01}}
    path = tmp_path / "classifier.ckpt"
    torch.save(ckpt, path)

    loaded = backbone_from_classifier_checkpoint(path)
    assert set(loaded) == {k[len("model."):] for k in trunk}

    model = DeepLabLargeFOV(weights=f"classifier:{path}", width=NARROW)
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, trunk[f"model.features.{key}"]), key
    assert model.fc6.weight.abs().sum() > 0  # fc6/fc7 random, not left at zero


def test_real_lightning_checkpoint_loads(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from wsss.models.classifier import CAMClassifier

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"lr": 0.01, "width": NARROW})
            self.model = CAMClassifier(weights="none", width=NARROW)

    with pytest.warns(UserWarning):
        module = Module()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", max_epochs=0)
    trainer.strategy.connect(module)
    path = tmp_path / "real.ckpt"
    trainer.save_checkpoint(path)
    model = DeepLabLargeFOV(weights=f"classifier:{path}", width=NARROW)
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, module.model.features.state_dict()[key]), key


@pytest.mark.parametrize("content", ["garbage", "not-lightning", "no-trunk", "missing"])
def test_wrong_classifier_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content == "garbage":
        path.write_bytes(b"this is not a torch file")
    elif content == "not-lightning":
        torch.save({f"features.{k}": v for k, v in vgg16_features(NARROW).state_dict().items()}, path)
    elif content == "no-trunk":
        torch.save({"state_dict": {"model.fc6.weight": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match=str(path.name)):
        DeepLabLargeFOV(weights=f"classifier:{path}", width=NARROW)


def test_classifier_checkpoint_of_other_width_is_refused(tmp_path):
    torch.save({"state_dict": _classifier_trunk_state(0.25)}, tmp_path / "wide.ckpt")
    with pytest.raises(WeightsError, match="wide.ckpt"):
        DeepLabLargeFOV(weights=f"classifier:{tmp_path / 'wide.ckpt'}", width=NARROW)


def test_batch_norm_trunk_loads_from_a_batch_norm_classifier_and_only_from_one(tmp_path):
    from wsss.models.classifier import CAMClassifier

    torch.manual_seed(3)
    classifier = CAMClassifier(weights="none", width=NARROW, batch_norm=True)
    for module in classifier.features.modules():  # non-default BN statistics, so copying them is visible
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    path = tmp_path / "bn.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in classifier.state_dict().items()}}, path)

    model = DeepLabLargeFOV(weights=f"classifier:{path}", width=NARROW, batch_norm=True)
    own = model.features.state_dict()
    assert any(k.endswith("running_mean") for k in own)
    for key, value in classifier.features.state_dict().items():
        assert torch.equal(own[key], value), key
    with pytest.raises(WeightsError, match="bn.ckpt"):  # BN keys do not fit a plain trunk
        DeepLabLargeFOV(weights=f"classifier:{path}", width=NARROW)
    with pytest.raises(WeightsError, match="batch_norm"):
        DeepLabLargeFOV(weights="imagenet", batch_norm=True)


def test_param_groups_follow_deeplab_convention():
    model = narrow()
    groups = model.param_groups()
    assert set(groups) == {"weights", "biases", "head_weights", "head_biases"}
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [id(p) for p in groups["head_weights"]] == [id(model.fc8.weight)]
    assert [id(p) for p in groups["head_biases"]] == [id(model.fc8.bias)]
    assert all(p.dim() == 1 for p in groups["biases"]) and len(groups["biases"]) == 15  # 13 convs + fc6 + fc7
    assert all(p.dim() == 4 for p in groups["weights"]) and len(groups["weights"]) == 15
    assert LR_MULTIPLIERS == {"weights": 1.0, "biases": 2.0, "head_weights": 10.0, "head_biases": 20.0}

    opt_groups = {g["name"]: g for g in model.optimizer_param_groups(lr=1e-3, weight_decay=5e-4)}
    assert opt_groups["biases"]["lr"] == pytest.approx(2e-3) and opt_groups["biases"]["weight_decay"] == 0
    assert opt_groups["head_weights"]["lr"] == pytest.approx(1e-2)
    assert opt_groups["head_weights"]["weight_decay"] == pytest.approx(5e-4)
    assert opt_groups["head_biases"]["lr"] == pytest.approx(2e-2) and opt_groups["head_biases"]["weight_decay"] == 0
    torch.optim.SGD(list(opt_groups.values()), lr=1e-3, momentum=0.9)  # accepted as-is


def test_conv_only_weights_file_loads_the_trunk_and_logs_random_fc6_fc7(tmp_path, caplog):
    torch.manual_seed(1)
    conv_only = {k: v for k, v in _fake_vgg_state(NARROW).items() if k.startswith("features.")}
    path = tmp_path / "vgg16_conv.pth"
    torch.save(conv_only, path)
    with caplog.at_level("WARNING", logger="wsss.models.deeplab"):
        torch.manual_seed(5)
        model = DeepLabLargeFOV(weights=str(path), width=NARROW)
    assert torch.equal(model.features[28].weight, conv_only["features.28.weight"])
    assert any("fc6/fc7 are initialised randomly" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    # fc6/fc7 start as DeepLab's added layers do, N(0, 0.01), not at the Kaiming scale of weights="none"
    # (which, under VGG's raw activations, made the first steps on real photos diverge).
    for conv in (model.fc6, model.fc7):
        assert abs(float(conv.weight.std()) - 0.01) < 0.001 and abs(float(conv.weight.mean())) < 0.001
        assert not conv.bias.any()
    torch.manual_seed(5)
    random_init = DeepLabLargeFOV(weights="none", width=NARROW)
    assert float(random_init.fc6.weight.std()) > 0.03  # Kaiming, fan_out = 128 * 9
    # Random fc6/fc7 under a pretrained trunk learn at the rate of the layers DeepLab adds (fc8's).
    groups = {name: {id(p) for p in params} for name, params in model.param_groups().items()}
    assert groups["head_weights"] == {id(model.fc6.weight), id(model.fc7.weight), id(model.fc8.weight)}
    assert groups["head_biases"] == {id(model.fc6.bias), id(model.fc7.bias), id(model.fc8.bias)}
    assert id(model.features[28].weight) in groups["weights"]


@pytest.mark.parametrize("batch_norm, expected_std", [(False, 0.01), (True, math.sqrt(2 / (128 * 9)))])
def test_random_fc6_under_a_classifier_trunk_is_scaled_for_the_trunk(tmp_path, batch_norm, expected_std):
    """A plain VGG trunk's raw activations get the small N(0, 0.01) start; a batch-norm trunk (unit-scale
    outputs, the toy preset) keeps Kaiming's."""
    trunk = vgg16_features(NARROW, batch_norm=batch_norm).state_dict()
    path = tmp_path / "cls.ckpt"
    torch.save({"state_dict": {f"model.features.{k}": v for k, v in trunk.items()}}, path)
    torch.manual_seed(0)
    model = DeepLabLargeFOV(weights=f"classifier:{path}", width=NARROW, batch_norm=batch_norm)
    assert abs(float(model.fc6.weight.std()) - expected_std) < 0.1 * expected_std


def test_frozen_stages_leave_their_parameters_out_of_the_optimizer():
    model = DeepLabLargeFOV(weights="none", width=NARROW, frozen_stages=2)
    grouped = {id(p) for params in model.param_groups().values() for p in params}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert grouped == trained
    assert not model.features[0].weight.requires_grad and not model.features[7].weight.requires_grad  # conv1_1, conv2_2
    assert model.features[10].weight.requires_grad and model.fc6.weight.requires_grad  # conv3_1, fc6


def test_forward_features_is_the_dilated_trunk_and_forward_head_the_rest():
    torch.manual_seed(0)
    model = DeepLabLargeFOV(weights="none", width=NARROW).eval()
    images = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape[-2:] == (9, 7)  # 1/8, ceil-pooled: 65 -> 9, 49 -> 7
        torch.testing.assert_close(features, model.features(images))
        torch.testing.assert_close(model.forward_head(features), model(images))
