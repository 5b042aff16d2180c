"""Gradient-based class activation maps (Grad-CAM, Grad-CAM++, LayerCAM) and their fusion.

Pure tensor math: no Lightning, no file I/O. Formulas follow ``SPEC.md`` ("CAMs", "Fusion"):
with ``g = dy^c/dA`` the gradient of the pre-softmax score of class ``c`` with respect to a
layer's activations ``A`` (channels ``k``, positions ``i, j``),

- Grad-CAM:   ``w_k = mean_ij g_kij``;  ``M = ReLU(sum_k w_k A_k)``
- Grad-CAM++: ``w_k = sum_ij alpha_kij ReLU(g_kij)``,
  ``alpha = g^2 / (2 g^2 + (sum_ab A_kab) g^3)`` and ``alpha = 0`` where that denominator is 0;
  ``M = ReLU(sum_k w_k A_k)``
- LayerCAM:   ``M_ij = ReLU(sum_k ReLU(g_kij) A_kij)``

Fusion (LayerCAM eq. 9): every layer's map is divided by its maximum, shallow layers are further
scaled by ``tanh(gamma * m)``, maps are bilinearly upsampled to the image size and fused by an
element-wise maximum. Two options beyond the paper (defaults: the paper's): ``peak_quantile`` q < 1
divides each map by its q-quantile instead of its maximum and clips at 1, and ``fusion="mean"``
averages the layers instead of taking their maximum.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("layercam", "gradcam", "gradcam++")
FUSIONS = ("max", "mean")


def compute_cams(
    model: nn.Module,
    images: Tensor,
    class_ids: Sequence[Sequence[int]],
    layers: Sequence[str] | str,
    method: str = "layercam",
) -> dict[str, list[Tensor]]:
    """Raw class activation maps of the requested classes at the requested layers.

    Args:
        model: any module mapping ``images`` (N, 3, H, W) to logits (N, C). It runs in eval mode
            for the call, whatever its mode: in train mode BatchNorm would normalise with the
            batch's statistics and dropout drop at random, so an image's maps would depend on the
            other images of the batch. Every module's own training flag is put back afterwards.
        images: batch on the model's device. It never needs (or gets) a gradient; tensors created
            under ``torch.inference_mode`` are accepted (they are copied once).
        class_ids: one sequence of class indices into the logits per image, of any length
            (possibly empty).
        layers: names from ``model.named_modules()``; if the model has a ``layer_aliases`` dict
            (e.g. ``CAMClassifier``'s ``"stage3"`` -> ``"features.15"``) its keys are accepted too.
            Each layer's output must be a (N, channels, h, w) tensor.
        method: ``"layercam"``, ``"gradcam"`` or ``"gradcam++"``.

    Returns:
        ``{layer: [maps of image n]}``, keyed by the names as passed; the maps of image ``n`` are a
        (len(class_ids[n]), h, w) tensor at the layer's own resolution, in ``class_ids[n]`` order,
        after the final ReLU and before any normalisation (``(0, h, w)`` for an empty class list).

    Cost: images are grouped by their number of classes K; each group takes one forward pass and
    K backward passes, backward k giving the gradients of every image's k-th class at once (images
    are independent, so the gradient of a sum of per-image scores is the per-image gradients). So
    every image costs one forward and one activation-gradient backward per class, as if it were
    alone, with the batch's parallelism; images without classes cost nothing. Parameters never
    receive gradients and nothing before the shallowest hooked layer is recorded for autograd, so
    that part of the forward costs what inference costs.
    :func:`compute_cam_sets` gives several methods from the same passes.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (it enables grad internally).
    Hooks, ``requires_grad`` and training flags of the model are restored even when an error is raised.

    Raises:
        ValueError: unknown method or layer, ``len(class_ids) != N``, a class index outside the
            logits, a layer whose output is not 4-D or that is run twice per forward or that does
            not influence the logits, or a model whose parameters are inference tensors.
    """
    return compute_cam_sets(model, images, class_ids, {method: layers})[method]


def compute_cam_sets(
    model: nn.Module,
    images: Tensor,
    class_ids: Sequence[Sequence[int]],
    requests: Mapping[str, Sequence[str] | str],
) -> dict[str, dict[str, list[Tensor]]]:
    """:func:`compute_cams` for several methods, each at its own layers, from the same forward and
    backward passes (the cost :func:`compute_cams` describes for the union of the layers): the
    three methods need only the activations and their gradients, so LayerCAM at stages 3-5 plus
    Grad-CAM and Grad-CAM++ at stage 5 cost what LayerCAM alone costs.

    Args:
        requests: ``{method: layers}``, e.g. ``{"layercam": ["stage3", "stage5"], "gradcam": ["stage5"]}``.
        model, images, class_ids: as in :func:`compute_cams`.

    Returns:
        ``{method: {layer: [maps of image n]}}``: every entry exactly what ``compute_cams(model,
        images, class_ids, layers, method)`` returns (the same gradients, so the same numbers).
    """
    if not requests:
        raise ValueError("no CAM methods requested")
    wanted: dict[str, list[str]] = {}
    for method, layers in requests.items():
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(METHODS)}")
        wanted[method] = [layers] if isinstance(layers, str) else list(layers)
        if not wanted[method]:
            raise ValueError(f"no layers requested for {method}")
    module_names = resolve_layers(model, [layer for layers in wanted.values() for layer in layers])
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, 3, H, W) batch, got shape {tuple(images.shape)}")
    if len(class_ids) != images.shape[0]:
        raise ValueError(f"class_ids has {len(class_ids)} entries for a batch of {images.shape[0]} images; give one list per image")
    classes = [_as_index_list(ids, n) for n, ids in enumerate(class_ids)]
    if any(t.is_inference() for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            "the model's parameters are inference tensors (it was built or loaded under torch.inference_mode); "
            "gradients cannot flow through them. Create or load the model outside inference mode."
        )

    methods_at: dict[str, list[str]] = {}  # module name -> the methods computed from its gradients
    for method, layers in wanted.items():
        for layer in layers:
            at = methods_at.setdefault(module_names[layer], [])
            if method not in at:
                at.append(method)
    # A backward for class slot k runs over every image of the forward, also those without a k-th
    # class; so images are split by class count, each group one forward and its own backwards.
    # Images without classes need no pass at all when another group gives the maps' size.
    groups: dict[int, list[int]] = {}
    for n, ids in enumerate(classes):
        groups.setdefault(len(ids), []).append(n)
    passes = [members for count, members in sorted(groups.items()) if count] or [list(range(len(classes)))]
    maps: dict[tuple[str, str], list[Tensor | None]] = {}
    with torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():
            # Inference tensors cannot take part in autograd; a normal copy can.
            images = images.clone()
        for members in passes:
            batch = images if len(members) == len(classes) else images[members]
            activations, logits = _forward_with_hooks(model, batch.detach(), list(methods_at))
            for key, group_maps in _maps_for_all_classes(activations, logits, [classes[n] for n in members], methods_at).items():
                slots = maps.setdefault(key, [None] * len(classes))
                for n, image_maps in zip(members, group_maps):
                    slots[n] = image_maps
    for slots in maps.values():
        size = next(m for m in slots if m is not None).shape[1:]
        for n, image_maps in enumerate(slots):
            if image_maps is None:  # an image without classes: (0, h, w)
                slots[n] = images.new_zeros((0, *size))
    return {method: {layer: list(maps[method, module_names[layer]]) for layer in layers} for method, layers in wanted.items()}


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Map each requested layer name (module name or ``model.layer_aliases`` key) to a module name.

    Raises:
        ValueError: a name that is neither, with the list of valid names.
    """
    modules = {name for name, _ in model.named_modules() if name}
    aliases = getattr(model, "layer_aliases", None)
    aliases = dict(aliases) if isinstance(aliases, Mapping) else {}
    resolved: dict[str, str] = {}
    for name in layers:
        target = aliases.get(name, name)
        if target not in modules:
            valid = [*aliases, *sorted(modules, key=_natural_key)]
            raise ValueError(f"unknown layer {name!r} for {type(model).__name__}; valid names: {', '.join(valid)}")
        resolved[name] = target
    return resolved


def normalize_maps(maps: Tensor, tanh_scaled: bool = False, gamma: float = 2.0, peak_quantile: float = 1.0) -> Tensor:
    """Divide each map of a (K, h, w) stack by its own maximum; optionally apply ``tanh(gamma * m)``.

    Maps are non-negative (they come after a ReLU); a map whose maximum is 0 stays 0. The result
    lies in [0, 1] (``tanh_scaled=True`` is the paper's treatment of shallow layers, eq. 9).

    ``peak_quantile`` q < 1 divides by the map's q-quantile instead (numpy's default, linear
    interpolation between order statistics) and clips at 1: a LayerCAM map's maximum is often a
    few hot pixels, which pushes the rest of the object below any threshold. A map whose
    q-quantile is 0 (fewer than 1 - q of its pixels positive) is divided by its maximum.
    """
    if not 0 < peak_quantile <= 1:
        raise ValueError(f"peak_quantile must be in (0, 1], got {peak_quantile!r}")
    if not maps.numel():
        return maps.clone()
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    if peak_quantile < 1:
        scale = _quantile_of_maps(maps, peak_quantile)
        peak = torch.where(scale > 0, scale, peak)
    normalized = maps / torch.where(peak > 0, peak, torch.ones_like(peak))
    if peak_quantile < 1:
        normalized = normalized.clamp_(max=1.0)
    return torch.tanh(gamma * normalized) if tanh_scaled else normalized


def _quantile_of_maps(maps: Tensor, q: float) -> Tensor:
    """The q-quantile of each (h, w) map of a (K, h, w) stack, shape (K, 1, 1); linear interpolation
    as ``numpy.quantile``. Order statistics by ``kthvalue``: ``torch.quantile`` refuses inputs
    above 2**24 elements, which a few class maps of a large photo reach."""
    flat = maps.flatten(-2)
    position = q * (flat.shape[-1] - 1)
    below = int(position)
    low = flat.kthvalue(below + 1, dim=-1).values
    high = flat.kthvalue(min(below + 2, flat.shape[-1]), dim=-1).values
    return (low + (position - below) * (high - low))[:, None, None]


def fuse_cams(maps: Sequence[Tensor], size: tuple[int, int], tanh_scaled: Sequence[bool], gamma: float = 2.0,
              peak_quantile: float = 1.0, fusion: str = "max") -> Tensor:
    """Fuse the per-layer maps of ONE image into (K, H, W) maps in [0, 1] (LayerCAM eq. 9).

    Args:
        maps: one (K, h_l, w_l) tensor per layer, the same K classes in the same order.
        size: (H, W) of the output, normally the image size.
        tanh_scaled: per layer, whether to apply ``tanh(gamma * m)`` after dividing by the
            maximum (the paper does this for shallow stages 1-3; callers that name layers call
            that set ``scaled_layers``).
        gamma: the tanh scale (paper: 2).
        peak_quantile: what each map is divided by, see :func:`normalize_maps` (1: its maximum,
            the paper).
        fusion: ``"max"`` (the paper: element-wise maximum over layers) or ``"mean"`` (their
            average: a shallow layer's response off the object counts only as far as the other
            layers share it).

    Each layer's map is normalised by :func:`normalize_maps`, upsampled bilinearly
    (``align_corners=False``) to ``size``, and the layers are combined by ``fusion``.
    """
    if not maps:
        raise ValueError("fuse_cams needs at least one layer's maps")
    if len(tanh_scaled) != len(maps):
        raise ValueError(f"tanh_scaled has {len(tanh_scaled)} entries for {len(maps)} layers")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
    counts = {m.shape[0] for m in maps}
    if len(counts) != 1 or any(m.ndim != 3 for m in maps):
        raise ValueError(f"every layer needs a (K, h, w) tensor with the same K, got shapes {[tuple(m.shape) for m in maps]}")
    fused: Tensor | None = None
    for layer_maps, scaled in zip(maps, tanh_scaled):
        layer = _resize(normalize_maps(layer_maps, tanh_scaled=bool(scaled), gamma=gamma, peak_quantile=peak_quantile), size)
        if fused is None:
            fused = layer.clone() if fusion == "mean" else layer
        elif fusion == "mean":
            fused.add_(layer)
        else:
            fused = torch.maximum(fused, layer)
    assert fused is not None
    return fused / len(maps) if fusion == "mean" else fused


VIEW_WEIGHTINGS = ("area", "max", "none")


def accumulate_multiscale(views: Sequence[Sequence[Tensor]], flipped: Sequence[bool], size: tuple[int, int],
                          scales: Sequence[float] | None = None, weighting: str = "area") -> list[Tensor]:
    """Combine one image's per-layer maps over its test-time views (rescalings, horizontal flips).

    A gradient-based map scales as 1/(h * w) of the classifier's pooled feature map (the global
    average pool divides every gradient by it), so a view at scale ``s`` gives maps ~1/s^2 as large
    as at scale 1: summed raw, a 0.5x view outweighs a 2x view sixteen times. ``weighting`` says
    how views are made comparable before the sum:

    - ``"area"`` (default): each view's maps times ``s^2``, undoing the pool's 1/(h * w);
    - ``"max"``: each view's maps divided by their own per-class maximum, every view counting alike;
    - ``"none"``: summed as computed (what this function did before the weighting existed).

    A single view is returned as computed (resized and flipped back) whatever ``weighting``, so
    single-scale maps are the same bits with every setting.

    Args:
        views: ``views[v][l]`` is the (K, h, w) raw map of layer ``l`` computed on view ``v`` (the
            image resized and possibly flipped left-right), same classes in the same order.
        flipped: per view, whether that view was flipped; its maps are flipped back.
        size: (H, W) of the original image.
        scales: per view, its scale (needed by ``"area"``).
        weighting: ``"area"``, ``"max"`` or ``"none"``.

    Returns:
        One (K, H, W) tensor per layer: the maps of all views upsampled bilinearly
        (``align_corners=False``) to ``size``, weighted and summed, ready for :func:`normalize_maps` /
        :func:`fuse_cams` (normalisation happens after the sum, as the stage specifies).
    """
    if not views:
        raise ValueError("accumulate_multiscale needs at least one view")
    if len(flipped) != len(views):
        raise ValueError(f"flipped has {len(flipped)} entries for {len(views)} views")
    if weighting not in VIEW_WEIGHTINGS:
        raise ValueError(f"unknown view weighting {weighting!r}; expected one of {', '.join(VIEW_WEIGHTINGS)}")
    if weighting == "area" and len(views) > 1 and (scales is None or len(scales) != len(views)):
        raise ValueError("the 'area' weighting needs the scale of every view")
    num_layers = len(views[0])
    if any(len(view) != num_layers for view in views):
        raise ValueError("every view must give maps for the same layers")
    totals: list[Tensor] = []
    for layer in range(num_layers):
        total: Tensor | None = None
        for index, (view, flip) in enumerate(zip(views, flipped)):
            layer_maps = view[layer].flip(-1) if flip else view[layer]
            resized = _resize(layer_maps, size)
            if len(views) > 1 and weighting == "area":
                resized = resized * float(scales[index]) ** 2
            elif len(views) > 1 and weighting == "max":
                resized = normalize_maps(resized)
            total = resized.clone() if total is None else total.add_(resized)
        assert total is not None
        totals.append(total)
    return totals


def _forward_with_hooks(model: nn.Module, images: Tensor, module_names: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """One forward pass recording the outputs of ``module_names`` as autograd inputs.

    The model runs in eval mode and its parameters are frozen for the pass, so autograd records
    only what follows the first hooked layer; hooks, training and ``requires_grad`` flags are
    restored before returning or raising.
    """
    modules = dict(model.named_modules())
    activations: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layer {name!r} must output a (N, channels, h, w) tensor, got {shape}")
            if name in activations:
                raise ValueError(f"layer {name!r} runs more than once per forward pass; hook a module that runs once")
            # Upstream of the first hooked layer nothing requires grad; start the graph here.
            activation = output if output.requires_grad else output.detach().requires_grad_()
            activations[name] = activation
            # Later modules get a copy, so an in-place op downstream (e.g. ReLU(inplace=True)
            # after a hooked conv) cannot overwrite the recorded activation or its history.
            return activation.clone()

        return hook

    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    handles = []
    try:
        model.eval()
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for name in module_names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        for module, training in modes:
            module.training = training
    missing = [name for name in module_names if name not in activations]
    if missing:
        raise ValueError(f"layers {missing} did not run during the forward pass")
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape (N, C) = ({images.shape[0]}, C), got {shape}")
    return activations, logits


def _maps_for_all_classes(
    activations: dict[str, Tensor], logits: Tensor, classes: list[list[int]], methods_at: dict[str, list[str]]
) -> dict[tuple[str, str], list[Tensor]]:
    """One backward per class slot k (the sum over images of their k-th class score); every method
    asked for at a layer is computed from that layer's gradients. Keys: (method, module name)."""
    num_classes = logits.shape[1]
    for n, ids in enumerate(classes):
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"class index {bad[0]} of image {n} is outside the model's {num_classes} logits")
    names = list(activations)
    inputs = [activations[name] for name in names]
    out = {
        (method, name): [a.new_zeros((len(ids), *a.shape[2:])) for ids in classes]
        for name, a in zip(names, inputs) for method in methods_at[name]
    }
    slots = max((len(ids) for ids in classes), default=0)
    if slots and not logits.requires_grad:
        raise ValueError("the logits do not depend on the hooked layers (does the model detach its features?)")
    for k in range(slots):
        rows = [n for n, ids in enumerate(classes) if len(ids) > k]
        score = logits[rows, [classes[n][k] for n in rows]].sum()
        grads = torch.autograd.grad(score, inputs, retain_graph=k < slots - 1, allow_unused=True)
        with torch.no_grad():
            for name, activation, grad in zip(names, inputs, grads):
                if grad is None:
                    raise ValueError(f"layer {name!r} does not influence the logits; no CAM can be computed there")
                if len(rows) < activation.shape[0]:
                    index = torch.tensor(rows, device=grad.device)
                    activation, grad = activation.index_select(0, index), grad.index_select(0, index)
                for method in methods_at[name]:
                    maps = cam_from_gradients(activation.detach(), grad, method)
                    for i, n in enumerate(rows):
                        out[method, name][n][k] = maps[i]
        del grads
    return out


def cam_from_gradients(activations: Tensor, gradients: Tensor, method: str = "layercam") -> Tensor:
    """Maps (N, h, w) from activations and gradients (N, channels, h, w) of one class per image."""
    if method == "layercam":
        return torch.relu(gradients).mul_(activations).sum(dim=1).relu_()
    if method == "gradcam":
        weights = gradients.mean(dim=(2, 3))
    elif method == "gradcam++":
        squared = gradients * gradients
        denominator = 2 * squared + activations.sum(dim=(2, 3), keepdim=True) * squared * gradients
        nonzero = denominator != 0
        alpha = torch.where(nonzero, squared / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0)
        weights = (alpha * torch.relu(gradients)).sum(dim=(2, 3))
    else:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(METHODS)}")
    return torch.einsum("nk,nkhw->nhw", weights, activations).relu_()


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of a (K, h, w) stack; a no-op at the same size."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    return F.interpolate(maps.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)


def _as_index_list(ids: Sequence[int], image: int) -> list[int]:
    try:
        return [operator.index(c) for c in ids]
    except TypeError as exc:
        raise ValueError(f"class_ids[{image}] must be a sequence of integer class indices, got {ids!r}") from exc


def _natural_key(name: str) -> list[tuple[int, str]]:
    """Sort ``features.10`` after ``features.9``."""
    return [(int(part), "") if part.isdigit() else (-1, part) for part in name.split(".")]
