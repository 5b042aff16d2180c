"""Tests of wsss.cams: CAM maps against plain autograd and pytorch-grad-cam, fusion by hand."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from wsss.cams import METHODS, accumulate_multiscale, compute_cams, fuse_cams, normalize_maps
from wsss.models.classifier import CAMClassifier


class TinyNet(nn.Module):
    """Conv -> ReLU(inplace) twice, GAP, linear: hooking ``conv1`` sees its output modified in place."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.act2(self.conv2(self.act1(self.conv1(images))))
        return self.fc(features.mean(dim=(2, 3)))


class ExplodingNet(TinyNet):
    """Fails after the hooked layers have run, to check clean-up on errors raised mid-forward."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.act2(self.conv2(self.act1(self.conv1(images))))
        raise RuntimeError("boom")


def make_classifier(width: float = 0.125) -> CAMClassifier:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weights="none" warns loudly by design
        return CAMClassifier(num_classes=20, weights="none", width=width).double().eval()


def make_tiny() -> TinyNet:
    torch.manual_seed(1)
    return TinyNet().double().eval()


def reference_map(activation: torch.Tensor, gradient: torch.Tensor, method: str) -> torch.Tensor:
    """SPEC.md formulas for one image and class; activation and gradient are (K, h, w)."""
    if method == "layercam":
        return torch.clamp((torch.clamp(gradient, min=0) * activation).sum(dim=0), min=0)
    if method == "gradcam":
        weights = gradient.mean(dim=(1, 2))
    else:
        weights = torch.zeros(activation.shape[0], dtype=activation.dtype)
        for k in range(activation.shape[0]):
            g, total = gradient[k], activation[k].sum()
            denominator = 2 * g**2 + total * g**3
            alpha = torch.zeros_like(g)
            alpha[denominator != 0] = g[denominator != 0] ** 2 / denominator[denominator != 0]
            weights[k] = (alpha * torch.clamp(g, min=0)).sum()
    return torch.clamp((weights[:, None, None] * activation).sum(dim=0), min=0)


def reference_cams(model: nn.Module, images: torch.Tensor, class_ids, layers, method: str) -> dict[str, list[torch.Tensor]]:
    """Per image and class: a fresh forward of that image alone and ``.backward()`` of that score."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False  # so the recorded outputs are the tensors the module returned
    aliases = getattr(model, "layer_aliases", {})
    result: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for n, ids in enumerate(class_ids):
        maps: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        for c in ids:
            recorded: dict[str, torch.Tensor] = {}

            def record(layer):
                def hook(module, inputs, output):
                    output.retain_grad()
                    recorded[layer] = output
                return hook

            handles = [model.get_submodule(aliases.get(layer, layer)).register_forward_hook(record(layer)) for layer in layers]
            logits = model(images[n:n + 1].clone())
            for handle in handles:
                handle.remove()
            model.zero_grad()
            logits[0, c].backward()
            for layer in layers:
                maps[layer].append(reference_map(recorded[layer][0].detach(), recorded[layer].grad[0], method))
        for layer in layers:
            shape = recorded_shape(model, images, aliases.get(layer, layer)) if not ids else None
            result[layer].append(torch.stack(maps[layer]) if ids else torch.zeros(0, *shape, dtype=images.dtype))
    return result


def recorded_shape(model: nn.Module, images: torch.Tensor, module_name: str) -> tuple[int, int]:
    shapes = []
    handle = model.get_submodule(module_name).register_forward_hook(lambda m, i, o: shapes.append(o.shape[-2:]))
    with torch.no_grad():
        model(images[:1])
    handle.remove()
    return tuple(shapes[0])


def hook_state(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]


def assert_maps_close(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for layer in reference:
        assert len(ours[layer]) == len(reference[layer])
        for mine, expected in zip(ours[layer], reference[layer]):
            assert mine.shape == expected.shape
            scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30)
            torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("method", METHODS)
def test_matches_per_image_autograd_on_classifier(method):
    model = make_classifier()
    images = torch.randn(4, 3, 48, 64, dtype=torch.float64)
    class_ids = [[3, 0, 7], [], [5], [1, 2]]
    # features.14 is conv3_3, whose output the following ReLU(inplace=True) overwrites.
    layers = ["stage3", "features.14", "features.22", "stage5"]
    ours = compute_cams(model, images, class_ids, layers, method)
    assert_maps_close(ours, reference_cams(model, images, class_ids, layers, method))
    assert ours["stage3"][0].shape == (3, 12, 16) and ours["stage5"][1].shape == (0, 3, 4)
    assert all(maps[0].amax() > 0 for maps in ours.values()), "degenerate all-zero maps would prove nothing"


@pytest.mark.parametrize("method", METHODS)
def test_matches_per_image_autograd_on_custom_module_with_inplace_relu(method):
    model = make_tiny()
    images = torch.randn(3, 3, 10, 12, dtype=torch.float64)
    class_ids = [[4, 1], [0, 2, 3], [2]]
    layers = ["conv1", "act1", "conv2", "act2"]
    ours = compute_cams(model, images, class_ids, layers, method)
    assert_maps_close(ours, reference_cams(model, images, class_ids, layers, method))
    if method != "layercam":
        # conv1's output must be recorded before act1 overwrites it in place. (LayerCAM cannot
        # tell: ReLU(g) * A is the same before and after a ReLU, as g is 0 where A < 0.)
        assert not torch.allclose(ours["conv1"][0], ours["act1"][0])


def test_one_forward_per_class_count_one_backward_per_class_and_no_parameter_gradients(monkeypatch):
    model = make_tiny()
    forwards, backwards = [], []
    handle = model.register_forward_pre_hook(lambda module, inputs: forwards.append(inputs[0].shape[0]))
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda outputs, inputs, **kw: backwards.append(inputs[0].shape[0]) or real_grad(outputs, inputs, **kw))
    class_ids = [[0, 1, 2], [3], [], [4], [2, 0, 1]]
    compute_cams(model, torch.randn(5, 3, 8, 8, dtype=torch.float64), class_ids, ["conv2"])
    handle.remove()
    # Images 1 and 3 (one class) share a pass, 0 and 4 (three) another; image 2 (none) needs none.
    assert forwards == [2, 2]
    # Every backward runs over images that all have that class slot: 2 + 3 * 2 = 8 image-backwards,
    # one per requested map, as if each image were alone.
    assert backwards == [2, 2, 2, 2] and sum(backwards) == sum(map(len, class_ids))
    assert all(p.grad is None for p in model.parameters())


def test_a_batch_without_any_class_still_gives_empty_maps_of_the_layer_size():
    maps = compute_cams(make_tiny(), torch.randn(2, 3, 8, 10, dtype=torch.float64), [[], []], ["conv1", "conv2"])
    assert [tuple(m.shape) for m in maps["conv1"]] == [(0, 8, 10)] * 2
    assert [tuple(m.shape) for m in maps["conv2"]] == [(0, 4, 5)] * 2


def _grad_cam_raw_maps(cam_class, model, layer_module, images, classes) -> np.ndarray:
    """pytorch-grad-cam's per-layer maps before its min-max scaling and resize.

    ``BaseCAM.compute_cam_per_layer`` does ``np.maximum(get_cam_image(...), 0)`` and then
    ``scale_cam_image``; we run the library's own forward/backward through ``__call__`` and
    then call its ``get_cam_image`` on the activations and gradients it recorded, stopping
    before the scaling.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(c) for c in classes]
    cam = cam_class(model=model, target_layers=[layer_module])
    try:
        cam(input_tensor=images, targets=targets)
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(images, layer_module, targets, activations, gradients, False), 0)
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", ["stage4", "stage5"])
def test_matches_pytorch_grad_cam(method, layer):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM

    model = make_classifier()
    with torch.no_grad():
        # Large gradients, so grad-cam's +1e-6 in the Grad-CAM++ denominator cannot matter.
        model.classifier.weight.mul_(1e4)
    images = torch.randn(3, 3, 48, 64, dtype=torch.float64)
    classes = [2, 11, 19]
    ours = compute_cams(model, images, [[c] for c in classes], [layer], method)[layer]
    cam_class = {"layercam": LayerCAM, "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
    theirs = _grad_cam_raw_maps(cam_class, model, model.get_submodule(model.layer_aliases[layer]), images, classes)
    assert theirs.shape == (3, *ours[0].shape[1:])
    assert theirs.max() > 0, "degenerate all-zero maps would prove nothing"
    np.testing.assert_allclose(torch.stack([m[0] for m in ours]).numpy(), theirs, rtol=1e-5, atol=1e-5 * theirs.max())


def test_fuse_equal_size_by_hand():
    shallow = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    deep = torch.tensor([[[3.0, 0.0], [0.0, 1.5]], [[0.0, 0.0], [0.0, 2.0]]])
    fused = fuse_cams([shallow, deep], (2, 2), tanh_scaled=[True, False])
    # shallow class 0 / 4 -> [[0, .25], [.5, 1]] -> tanh(2x); deep class 0 / 3 -> [[1, 0], [0, .5]].
    expected = torch.tensor([
        [[1.0, math.tanh(0.5)], [math.tanh(1.0), math.tanh(2.0)]],
        [[0.0, 0.0], [0.0, 1.0]],  # the all-zero shallow map stays 0
    ])
    torch.testing.assert_close(fused, expected)


def test_fuse_upsamples_after_tanh_by_hand():
    # Bilinear, align_corners=False, width 2 -> 4 samples the source at x = 0, .25, .75, 1 (clamped).
    maps = torch.tensor([[[0.0, 4.0], [0.0, 4.0]]])
    t = math.tanh(2.0)
    torch.testing.assert_close(fuse_cams([maps], (2, 4), tanh_scaled=[False]), torch.tensor([[[0.0, 0.25, 0.75, 1.0]] * 2]))
    torch.testing.assert_close(fuse_cams([maps], (2, 4), tanh_scaled=[True]), torch.tensor([[[0.0, 0.25 * t, 0.75 * t, t]] * 2]))


def test_fuse_constant_maps_and_max_over_layers():
    fine = torch.zeros(1, 4, 6)
    fine[0, 1, 2], fine[0, 3, 5] = 10.0, 5.0
    coarse = torch.full((1, 2, 3), 3.0)  # upsampled, a constant stays that constant
    fused = fuse_cams([fine, coarse], (4, 6), tanh_scaled=[False, True])
    expected = torch.full((1, 4, 6), math.tanh(2.0))
    expected[0, 1, 2] = 1.0
    torch.testing.assert_close(fused, expected)


def test_fuse_range_shape_and_empty():
    torch.manual_seed(0)
    maps = [torch.rand(3, 5, 7) * 50, torch.rand(3, 2, 3), torch.zeros(3, 4, 4)]
    fused = fuse_cams(maps, (33, 41), tanh_scaled=[True, False, True])
    assert fused.shape == (3, 33, 41)
    assert fused.min() >= 0 and fused.max() <= 1 and fused.max() > 0.9
    assert fuse_cams([torch.zeros(0, 5, 7), torch.zeros(0, 2, 3)], (9, 9), tanh_scaled=[True, False]).shape == (0, 9, 9)
    with pytest.raises(ValueError, match="same K"):
        fuse_cams([torch.rand(2, 3, 3), torch.rand(3, 3, 3)], (4, 4), tanh_scaled=[False, False])


def test_normalize_maps():
    maps = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(normalize_maps(maps), torch.tensor([[[0.25, 0.5], [0.0, 1.0]], [[0.0] * 2] * 2]))
    torch.testing.assert_close(normalize_maps(maps, tanh_scaled=True, gamma=3.0)[0, 0, 1], torch.tensor(math.tanh(1.5)))


def test_peak_quantile_by_hand_and_against_numpy():
    # One map holding 0, 1, ..., 99: its 0.99-quantile sits at position 0.99 * 99 = 98.01 between
    # the order statistics 98 and 99, so it is 98.01; everything above is clipped to 1.
    ramp = torch.arange(100.0).reshape(1, 10, 10)
    normalized = normalize_maps(ramp, peak_quantile=0.99)
    torch.testing.assert_close(normalized[0, 0, :3], torch.tensor([0.0, 1 / 98.01, 2 / 98.01]))
    torch.testing.assert_close(normalized[0, 9, 8:], torch.tensor([98 / 98.01, 1.0]))
    # A hot spot: the maximum (1000) would push the rest below 0.01; the quantile keeps its scale.
    torch.manual_seed(0)
    maps = torch.rand(3, 17, 23) * torch.tensor([1.0, 5.0, 0.5])[:, None, None]
    maps[0, 4, 4] = 1000.0
    for q in (0.5, 0.9, 0.99, 0.999):
        expected = np.clip(maps.numpy() / np.quantile(maps.numpy().reshape(3, -1), q, axis=1)[:, None, None], 0, 1)
        np.testing.assert_allclose(normalize_maps(maps, peak_quantile=q).numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalize_maps(maps, tanh_scaled=True, peak_quantile=0.9),
                               torch.tanh(2 * normalize_maps(maps, peak_quantile=0.9)))


def test_peak_quantile_one_is_the_maximum_bit_for_bit_and_a_zero_quantile_falls_back_to_it():
    torch.manual_seed(1)
    maps = torch.rand(2, 9, 11) * 7
    assert torch.equal(normalize_maps(maps, peak_quantile=1.0), maps / maps.amax(dim=(1, 2), keepdim=True))
    sparse = torch.zeros(2, 10, 10)  # class 0: two positive pixels of 100, so its 0.9-quantile is 0
    sparse[0, 0, 0], sparse[0, 5, 5] = 4.0, 2.0
    normalized = normalize_maps(sparse, peak_quantile=0.9)
    assert normalized[0, 0, 0] == 1.0 and normalized[0, 5, 5] == 0.5 and normalized.sum() == 1.5
    assert normalize_maps(torch.zeros(0, 4, 4), peak_quantile=0.9).shape == (0, 4, 4)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="peak_quantile"):
            normalize_maps(maps, peak_quantile=bad)


def test_mean_fusion_by_hand():
    shallow = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    deep = torch.tensor([[[3.0, 0.0], [0.0, 1.5]]])
    fused = fuse_cams([shallow, deep], (2, 2), tanh_scaled=[True, False], fusion="mean")
    # shallow / 4 -> tanh(2x) of [[0, .25], [.5, 1]]; deep / 3 -> [[1, 0], [0, .5]]; then averaged.
    expected = torch.tensor([[[0.5, math.tanh(0.5) / 2], [math.tanh(1.0) / 2, (math.tanh(2.0) + 0.5) / 2]]])
    torch.testing.assert_close(fused, expected)
    ramp = torch.arange(100.0).reshape(1, 10, 10)
    both = fuse_cams([ramp, ramp.flip(-1)], (10, 10), tanh_scaled=[False, False], peak_quantile=0.99, fusion="mean")
    torch.testing.assert_close(both, (normalize_maps(ramp, peak_quantile=0.99) + normalize_maps(ramp.flip(-1), peak_quantile=0.99)) / 2)
    single = torch.rand(2, 5, 5)
    assert torch.equal(fuse_cams([single], (5, 5), [False], fusion="mean"), fuse_cams([single], (5, 5), [False]))
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_cams([single], (5, 5), [False], fusion="sum")


def test_accumulate_multiscale_by_hand():
    base = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    views = [[base], [base.flip(-1)], [torch.full((1, 1, 1), 10.0)]]
    (total,) = accumulate_multiscale(views, flipped=[False, True, False], size=(2, 2), weighting="none")
    torch.testing.assert_close(total, 2 * base + 10)
    assert views[0][0] is base and torch.equal(base, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))


def test_views_of_known_scale_weigh_alike():
    """A pattern seen at scales 0.5, 1 and 2 gives maps 4x, 1x and 1/4x as large (the pooled map's
    1/(h*w)); weighted by area or by their own maximum, each view counts alike and the sum is 3x the
    pattern (raw, it would be 5.25x, 76% of it the 0.5x view)."""
    pattern = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    scales = [0.5, 1.0, 2.0]
    views = [[pattern / s**2] for s in scales]
    (by_area,) = accumulate_multiscale(views, [False] * 3, (2, 2), scales=scales)  # the default
    torch.testing.assert_close(by_area, 3 * pattern)
    (by_max,) = accumulate_multiscale(views, [False] * 3, (2, 2), scales=scales, weighting="max")
    torch.testing.assert_close(by_max, 3 * pattern / 4)
    (raw,) = accumulate_multiscale(views, [False] * 3, (2, 2), scales=scales, weighting="none")
    torch.testing.assert_close(raw, 5.25 * pattern)
    # One view: the maps as computed, whatever the weighting (single-scale output keeps its bits).
    for weighting in ("area", "max", "none"):
        (alone,) = accumulate_multiscale([[pattern / 4]], [False], (2, 2), scales=[0.5], weighting=weighting)
        assert torch.equal(alone, pattern / 4)
    with pytest.raises(ValueError, match="needs the scale of every view"):
        accumulate_multiscale(views, [False] * 3, (2, 2))


def test_under_no_grad_and_inference_mode():
    model = make_tiny()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    class_ids = [[1, 0], [3]]
    expected = compute_cams(model, images, class_ids, ["conv1", "act2"])
    with torch.no_grad():
        under_no_grad = compute_cams(model, images, class_ids, ["conv1", "act2"])
    with torch.inference_mode():
        inference_images = images.clone()  # an inference tensor
        under_inference = compute_cams(model, inference_images, class_ids, ["conv1", "act2"])
    assert inference_images.is_inference()
    for result in (under_no_grad, under_inference):
        for layer in expected:
            for mine, reference in zip(result[layer], expected[layer]):
                assert not mine.requires_grad
                torch.testing.assert_close(mine, reference)
    assert expected["conv1"][0].amax() > 0


def test_model_in_train_mode_gives_its_eval_mode_maps_alone_or_batched():
    """In train mode BatchNorm normalises with the batch's statistics (and dropout drops at random),
    so a backward of summed scores would mix the images of a batch. compute_cams runs the model in
    eval mode for the call, then puts back every module's own flag and leaves the running stats."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CAMClassifier(num_classes=20, weights="none", width=0.125, batch_norm=True).double()
    with torch.no_grad():
        model.train()(torch.randn(6, 3, 32, 32, dtype=torch.float64) * 2 + 1)  # running stats far from 0/1
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    class_ids = [[3], [0, 7], [12]]
    layers = ["stage3", "stage5"]
    expected = compute_cams(model.eval(), images, class_ids, layers)

    model.train()
    model.head.eval()  # a mixed state, to be restored exactly
    modes = [m.training for m in model.modules()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    batched = compute_cams(model, images, class_ids, layers)
    alone = [compute_cams(model, images[n:n + 1], [ids], layers) for n, ids in enumerate(class_ids)]
    assert_maps_close(batched, expected)
    for n, single in enumerate(alone):
        assert_maps_close(single, {layer: [expected[layer][n]] for layer in layers})
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_model_built_under_inference_mode_is_a_clear_error():
    with torch.inference_mode():
        model = TinyNet()
    with pytest.raises(ValueError, match="inference tensors"):
        compute_cams(model, torch.randn(1, 3, 8, 8), [[0]], ["conv1"])


@pytest.mark.parametrize(
    ("model_factory", "layers", "class_ids", "error"),
    [
        (make_tiny, ["conv2"], [[0], [1]], None),
        (make_tiny, ["fc"], [[0], [1]], "must output a \\(N, channels, h, w\\)"),  # raised inside the forward
        (lambda: ExplodingNet().double(), ["conv1", "act2"], [[0], [1]], "boom"),
        (make_tiny, ["conv2"], [[0], [5]], "outside the model's 5 logits"),  # raised after the forward
    ],
)
def test_hooks_and_requires_grad_restored(model_factory, layers, class_ids, error):
    model = model_factory()
    model.conv1.weight.requires_grad_(False)  # a mixed state, to be restored exactly
    flags = [p.requires_grad for p in model.parameters()]
    extra = model.conv2.register_forward_hook(lambda *args: None)  # the caller's own hook survives
    hooks = hook_state(model)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    if error is None:
        compute_cams(model, images, class_ids, layers)
    else:
        with pytest.raises((ValueError, RuntimeError), match=error):
            compute_cams(model, images, class_ids, layers)
    assert hook_state(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags
    extra.remove()
    assert sum(hook_state(model)) == 0


def test_bad_inputs_raise_clear_errors():
    model = make_classifier()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown layer 'stage9'.*stage3.*features\.15"):
        compute_cams(model, images, [[0], [1]], ["stage9"])
    with pytest.raises(ValueError, match="outside the model's 20 logits"):
        compute_cams(model, images, [[0], [20]], ["stage5"])
    with pytest.raises(ValueError, match="outside"):
        compute_cams(model, images, [[-1], [1]], ["stage5"])
    with pytest.raises(ValueError, match="2 images"):
        compute_cams(model, images, [[0]], ["stage5"])
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cams(model, images, [[0], [1]], ["stage5"], method="scorecam")
    with pytest.raises(ValueError, match="integer class indices"):
        compute_cams(model, images, [[0.5], [1]], ["stage5"])


def test_empty_class_lists_and_aliases_keyed_as_passed():
    model = make_classifier()
    images = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    result = compute_cams(model, images, [[], []], ["stage4", "features.29"])
    assert list(result) == ["stage4", "features.29"]
    assert [tuple(m.shape) for m in result["stage4"]] == [(0, 4, 6), (0, 4, 6)]
    assert [tuple(m.shape) for m in result["features.29"]] == [(0, 2, 3), (0, 2, 3)]
    mixed = compute_cams(model, images, [[], [4]], "stage4")
    assert mixed["stage4"][0].shape == (0, 4, 6) and mixed["stage4"][1].shape == (1, 4, 6)


def test_layer_that_does_not_reach_the_logits_is_an_error():
    class DetachedHead(TinyNet):
        def forward(self, images):
            return super().forward(images).detach()

    with pytest.raises(ValueError, match="do not depend on the hooked layers"):
        compute_cams(DetachedHead().double(), torch.randn(1, 3, 8, 8, dtype=torch.float64), [[0]], ["conv2"])


def test_several_methods_from_one_pass_equal_separate_calls():
    """compute_cam_sets gives, for every method at every layer, what a separate compute_cams call gives."""
    from wsss.cams import compute_cam_sets

    model = make_classifier()
    torch.manual_seed(3)
    images = torch.randn(3, 3, 64, 80, dtype=torch.float64)
    class_ids = [[3, 7], [], [1, 4, 19]]
    requests = {"layercam": ["stage3", "stage4", "stage5"], "gradcam": ["stage5"], "gradcam++": ["stage4", "stage5"]}
    together = compute_cam_sets(model, images, class_ids, requests)
    assert list(together) == list(requests)
    for method, layers in requests.items():
        alone = compute_cams(model, images, class_ids, layers, method)
        assert list(together[method]) == layers
        for layer in layers:
            for ours, reference in zip(together[method][layer], alone[layer]):
                assert ours.shape == reference.shape
                assert torch.allclose(ours, reference, rtol=0, atol=1e-6)
                assert torch.equal(ours, reference)  # the same gradients: bit for bit


def test_several_methods_cost_one_forward_and_one_backward_per_class_slot(monkeypatch):
    from wsss.cams import compute_cam_sets

    model = make_classifier()
    forwards, backwards = [], []
    model.register_forward_hook(lambda *args: forwards.append(1))
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or real_grad(*a, **k))
    compute_cam_sets(model, torch.randn(2, 3, 48, 48, dtype=torch.float64), [[0, 5], [2, 7]],
                     {"layercam": ["stage3", "stage5"], "gradcam": "stage5", "gradcam++": "stage5"})
    assert len(forwards) == 1 and len(backwards) == 2
