"""The CAM engine and its Python API (wsss.cams.CAM) on torchvision's VGG, ResNet, ConvNeXt, Swin
and ViT with random weights: against plain autograd (computed here, independently of wsss.cams)
and against pytorch-grad-cam."""
from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsss.cams import CAM, GradCAM, LayerCAM, cams_at_image_size, compute_cams, detect_layout, fuse_cams, tokens_to_nchw

NUM_CLASSES = 5


def _nchw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _nhwc(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def _vit_tokens(tensor: torch.Tensor, side: int = 4) -> torch.Tensor:
    """Drop the class token, lay the patch tokens on the side x side grid: written out here, not wsss.cams.tokens_to_nchw."""
    return tensor[:, 1:, :].reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)


def make_vgg() -> nn.Module:
    """torchvision's VGG class with a narrow trunk ending in its 512 channels, and a narrow head of
    its shape (Linear, ReLU, Dropout, Linear): the real head's 25088 x 4096 weights cost 400 MB."""
    from torchvision.models.vgg import VGG, make_layers

    with torch.device("meta"):
        model = VGG(make_layers([8, "M", 16, "M", 512]), num_classes=NUM_CLASSES, init_weights=False)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, NUM_CLASSES))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def make_resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)


def make_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    # layer_scale 1 (torchvision's default 1e-6 would leave the blocks' branches next to nothing)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], layer_scale=1.0, num_classes=NUM_CLASSES)


def make_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=NUM_CLASSES)


def make_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every gradient would be 0
    return model


# name -> (factory, image size (H, W), hooked layers, their layout written out by hand, reshape_transform for our API)
# Non-square images where the model allows, so a swapped h and w cannot pass. ViT: the last block's
# output reaches the head only through the class token (zero gradients on the patches), so its
# input norm is hooked, as pytorch-grad-cam's tutorial does.
ARCHITECTURES = {
    "vgg": (make_vgg, (32, 48), ["features.5", "features.7"], _nchw, None),
    "resnet": (make_resnet, (64, 96), ["layer3", "layer4"], _nchw, None),
    "convnext": (make_convnext, (32, 48), ["features.1", "features.3"], _nchw, None),
    "swin": (make_swin, (32, 48), ["features.1", "features.3"], _nhwc, None),
    "vit": (make_vit, (32, 32), ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.ln_1"], _vit_tokens, tokens_to_nchw),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request):
    factory, size, layers, by_hand, reshape = ARCHITECTURES[request.param]
    torch.manual_seed(1)
    return request.param, factory().double().eval(), torch.randn(3, 3, *size, dtype=torch.float64), layers, by_hand, reshape


def autograd_map(model: nn.Module, image: torch.Tensor, class_index: int, layer: str, to_nchw, method: str) -> torch.Tensor:
    """The raw (h, w) map of one class: forward of the image alone, ``torch.autograd.grad`` of its
    class score w.r.t. the layer's output, laid out by hand, the formula written out."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False  # the recorded output stays the tensor the layer returned
    recorded = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, inputs, output: recorded.append(output))
    logits = model(image[None])
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[0, class_index], recorded[0])
    activation, gradient = to_nchw(recorded[0].detach())[0], to_nchw(gradient)[0]
    if method == "layercam":
        return torch.clamp((torch.clamp(gradient, min=0) * activation).sum(dim=0), min=0)
    weights = gradient.mean(dim=(1, 2))
    return torch.clamp((weights[:, None, None] * activation).sum(dim=0), min=0)


def by_hand_pipeline(raw: dict[str, torch.Tensor], size, scaled: set[str], gamma: float = 2.0):
    """Upsample (bilinear, align_corners=False), divide by the maximum, tanh where scaled, maximum over layers."""
    layers = {}
    for layer, maps in raw.items():
        up = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        peak = up.amax(dim=(1, 2), keepdim=True)
        layers[layer] = up / torch.where(peak > 0, peak, torch.ones_like(peak))
    fused = torch.stack([torch.tanh(gamma * m) if layer in scaled else m for layer, m in layers.items()]).amax(dim=0)
    return fused, layers


def assert_close_scaled(mine: torch.Tensor, expected: torch.Tensor) -> None:
    assert mine.shape == expected.shape
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("method", ["layercam", "gradcam"])
def test_maps_match_plain_autograd(architecture, method):
    name, model, images, layers, by_hand, reshape = architecture
    targets = [[3], [1, 4], [0]]
    cam = CAM(model, [model.get_submodule(layers[0]), layers[1]], reshape, method=method, scaled_layers=[layers[0]])
    out = cam(images, targets)
    raw = compute_cams(model, images, targets, layers, method, layouts={layer: reshape for layer in layers} if reshape else None)
    assert out.classes == targets and list(out.layers) == layers
    for n, classes in enumerate(targets):
        reference = {layer: torch.stack([autograd_map(model, images[n], c, layer, by_hand, method) for c in classes]) for layer in layers}
        assert all(m.amax() > 0 for m in reference.values()), f"{name}: degenerate all-zero maps would prove nothing"
        for layer in layers:
            assert_close_scaled(raw[layer][n], reference[layer])
        fused, normalized = by_hand_pipeline(reference, images.shape[-2:], {layers[0]})
        assert out.fused[n].shape == (len(classes), *images.shape[-2:])
        for layer in layers:
            torch.testing.assert_close(out.layers[layer][n], normalized[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.fused[n], fused, rtol=1e-6, atol=1e-6)


def _grad_cam_raw_maps(cam_class, model, layer_module, images, classes, reshape_transform):
    """pytorch-grad-cam's own forward/backward (``__call__``), then its ``get_cam_image`` on what it
    recorded, before its min-max scaling and resizing."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(c) for c in classes]
    cam = cam_class(model=model, target_layers=[layer_module], reshape_transform=reshape_transform)
    try:
        cam(input_tensor=images, targets=targets)
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(images, layer_module, targets, activations, gradients, False), 0)
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize("method", ["layercam", "gradcam"])
def test_raw_maps_match_pytorch_grad_cam(architecture, method):
    """pytorch-grad-cam needs its reshape_transform for Swin and ViT (its own vit_reshape_transform);
    ours detects Swin's layout and takes tokens_to_nchw for ViT."""
    from pytorch_grad_cam import GradCAM as TheirGradCAM
    from pytorch_grad_cam import LayerCAM as TheirLayerCAM
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

    name, model, images, layers, _, reshape = architecture
    theirs_reshape = {"swin": _nhwc, "vit": partial(vit_reshape_transform, height=4, width=4)}.get(name)
    classes = [2, 4, 0]
    for layer in layers:
        ours = compute_cams(model, images, [[c] for c in classes], [layer], method, layouts={layer: reshape} if reshape else None)[layer]
        cam_class = {"layercam": TheirLayerCAM, "gradcam": TheirGradCAM}[method]
        theirs = _grad_cam_raw_maps(cam_class, model, model.get_submodule(layer), images, classes, theirs_reshape)
        assert theirs.max() > 0, "degenerate all-zero maps would prove nothing"
        mine = torch.stack([m[0] for m in ours]).numpy()
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6 * theirs.max())


def test_layouts_detected_for_torchvisions_channels_last_modules():
    swin, convnext, resnet = make_swin(), make_convnext(), make_resnet()
    swin_nhwc = ["features.0", "features.0.1", "features.0.2", "features.1", "features.1.1", "features.1.1.attn",
                 "features.1.1.mlp", "features.2", "features.3", "norm"]
    assert {name: detect_layout(swin, name) for name in swin_nhwc} == dict.fromkeys(swin_nhwc, "nhwc")
    assert detect_layout(swin, "features.0.0") == "nchw" and detect_layout(swin, "permute") == "nchw"  # the stem conv; back to NCHW
    # ConvNeXt: stages and its LayerNorm2d are NCHW; inside a block, the permuted norm and linear are NHWC.
    assert [detect_layout(convnext, n) for n in ("features.0", "features.0.1", "features.1", "features.1.0", "features.2", "features.3")] == ["nchw"] * 6
    assert [detect_layout(convnext, f"features.1.0.block.{i}") for i in (0, 1, 2, 3, 6)] == ["nchw", "nhwc", "nhwc", "nhwc", "nchw"]
    assert {detect_layout(resnet, n) for n in ("layer3", "layer4", "layer4.1", "layer4.1.bn2")} == {"nchw"}


def test_swin_detected_declared_and_as_reshape_transform_give_the_same_maps():
    model = make_swin().double().eval()
    images = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    targets = [[1], [2, 3]]
    detected = LayerCAM(model, ["features.3", "norm"])(images, targets)
    declared = LayerCAM(model, ["features.3", "norm"], layouts={"features.3": "nhwc", model.norm: "nhwc"})(images, targets)
    transformed = LayerCAM(model, ["features.3", "norm"], reshape_transform=_nhwc)(images, targets)
    for other in (declared, transformed):
        for a, b in zip(detected.fused, other.fused):
            assert torch.equal(a, b)
    # Declared NCHW, the (N, h, w, C) output would be read as h channels of w x C maps: refused here
    # only because the shapes then differ, so check they do.
    wrong = compute_cams(model, images, targets, ["features.3"], layouts={"features.3": "nchw"})["features.3"]
    assert wrong[0].shape[-2:] != compute_cams(model, images, targets, ["features.3"])["features.3"][0].shape[-2:]


def test_a_channels_last_module_of_ones_own_is_declared():
    class ChannelsLastNet(nn.Module):
        """A conv, then a per-position MLP in (N, h, w, C), as transformer-style blocks run."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.mlp = nn.Sequential(nn.Linear(6, 6), nn.GELU())  # ends in an activation: not detectable
            self.fc = nn.Linear(6, NUM_CLASSES)

        def forward(self, x):
            return self.fc(self.mlp(self.conv(x).permute(0, 2, 3, 1)).mean(dim=(1, 2)))

    torch.manual_seed(0)
    model = ChannelsLastNet().double().eval()
    images = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    assert detect_layout(model, "mlp") == "nchw"
    maps = compute_cams(model, images, [[1], [3]], ["mlp"], layouts={"mlp": "nhwc"})["mlp"]
    for n, c in enumerate([1, 3]):
        assert_close_scaled(maps[n][0], autograd_map(model, images[n], c, "mlp", _nhwc, "layercam"))


def test_reused_module_names_the_block_to_hook():
    model = make_resnet().eval()
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"'layer4\.1\.relu' runs 2 times.*enclosing block 'layer4\.1' \(or 'layer4'\)"):
        LayerCAM(model, [model.layer4[1].relu])(images, [[0]])
    assert LayerCAM(model, [model.layer4[1]])(images, [[0]]).fused[0].shape == (1, 64, 64)


def test_tokens_need_a_reshape_transform_and_a_bad_one_is_named():
    model = make_vit().eval()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"encoder_layer_0.*\(1, 17, 16\).*tokens.*reshape_transform.*tokens_to_nchw"):
        LayerCAM(model, ["encoder.layers.encoder_layer_0"])(images, [[0]])
    with pytest.raises(ValueError, match=r"reshape_transform of layer 'encoder.layers.encoder_layer_0'.*\(1, 17, 16\).*\(1, 16, 16\)"):
        LayerCAM(model, ["encoder.layers.encoder_layer_0"], lambda t: t[:, 1:].transpose(1, 2))(images, [[0]])
    grid = tokens_to_nchw(torch.arange(2 * 7 * 3.0).reshape(2, 7, 3), prefix_tokens=1, grid=(2, 3))
    assert grid.shape == (2, 3, 2, 3) and grid[0, :, 0, 1].tolist() == [6.0, 7.0, 8.0]  # token 2 (after the class token) at (0, 1)
    with pytest.raises(ValueError, match="square"):
        tokens_to_nchw(torch.zeros(1, 7, 3))


def test_targets_forms_and_target_layers_as_modules_or_names():
    model = make_resnet().double().eval()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    by_name = GradCAM(model, ["layer3", "layer4"], scaled_layers=["layer3"], fusion="mean", peak_quantile=0.9)
    by_module = GradCAM(model, [model.layer3, model.layer4], scaled_layers=[model.layer3], fusion="mean", peak_quantile=0.9)
    lists, ints = by_name(images, [[3], [1]]), by_module(images, [3, 1])
    assert lists.classes == ints.classes == [[3], [1]]
    for a, b in zip(lists.fused, ints.fused):
        assert torch.equal(a, b)
    # pytorch-grad-cam's targets=None: each image's highest-scoring class (one of them made class 3 here)
    with torch.no_grad():
        model.fc.bias[3] += (model(images[:1])[0].max() - model(images[:1])[0, 3]) + 1
        expected = [[int(c)] for c in model(images).argmax(dim=1)]
    assert expected[0] == [3]
    assert by_name(images).classes == expected
    empty = by_name(images, [[], [2, 0]])
    assert empty.fused[0].shape == (0, 64, 64) and empty.fused[1].shape == (2, 64, 64)
    with pytest.raises(ValueError, match="not a submodule"):
        LayerCAM(model, [nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match="scaled layers"):
        LayerCAM(model, ["layer4"], scaled_layers=["layer3"])
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        LayerCAM(model, ["layer9"])
    with pytest.raises(ValueError, match="targets has 1 entries"):
        by_name(images, [[0]])
    with pytest.raises(ValueError, match=r"targets\[1\] must be"):
        by_name(images, [[0], "x"])
    with pytest.raises(ValueError, match="layouts given for layers that are not requested"):
        compute_cams(model, images, [[0], [1]], ["layer4"], layouts={"layer3": "nhwc"})
    with pytest.raises(ValueError, match="unknown layout 'hwc'"):
        compute_cams(model, images, [[0], [1]], ["layer4"], layouts={"layer4": "hwc"})


def test_views_upsample_before_normalising_unlike_fuse_cams_on_layer_resolution_maps():
    """The API's maps are cams_at_image_size's: upsampled, then normalised and fused. fuse_cams on
    the layers' own resolutions normalises first: a different map (its peaks fall between the
    bilinear samples), which is why the recipe is cams_at_image_size, not fuse_cams."""
    model = make_resnet().double().eval()
    torch.manual_seed(3)
    images = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    raw = compute_cams(model, images, [[2, 4]], ["layer3", "layer4"])
    out = LayerCAM(model, ["layer3", "layer4"], scaled_layers=["layer3"])(images, [[2, 4]])
    recipe = cams_at_image_size([[raw["layer3"][0], raw["layer4"][0]]], (64, 96), [True, False])
    assert torch.equal(out.fused[0], recipe.fused)
    assert math.isclose(out.layers["layer4"][0].amax().item(), 1.0)
    early = fuse_cams([raw["layer3"][0], raw["layer4"][0]], (64, 96), [True, False])
    assert (early - recipe.fused).abs().max() > 1e-2
    flipped = LayerCAM(model, ["layer4"], scales=(1.0, 0.5), flip=True)(images, [[2]])
    views = [compute_cams(model, v, [[2]], ["layer4"])["layer4"][0] for v in
             (images, images.flip(-1), F.interpolate(images, size=(32, 48), mode="bilinear", align_corners=False),
              F.interpolate(images, size=(32, 48), mode="bilinear", align_corners=False).flip(-1))]
    by_hand = sum(F.interpolate((m.flip(-1) if i % 2 else m)[None], size=(64, 96), mode="bilinear", align_corners=False)[0] * s**2
                  for i, (m, s) in enumerate(zip(views, (1.0, 1.0, 0.5, 0.5))))
    torch.testing.assert_close(flipped.fused[0], by_hand / by_hand.amax())
