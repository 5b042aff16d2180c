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

:class:`CAM` (and :class:`LayerCAM`, :class:`GradCAM`, :class:`GradCAMPlusPlus`) runs the whole
recipe of ``wsss cams`` on any classifier: raw maps (:func:`compute_cams`), upsampled to the image
and summed over views (:func:`accumulate_multiscale`), normalised (:func:`normalize_maps`), fused
(:func:`fuse_cams`); :func:`cams_at_image_size` is that order, the one implementation both use.
Hooked outputs that are not (N, C, h, w) are turned into it by a layout: detected for torchvision's
channels-last modules (:func:`detect_layout`, e.g. Swin's (N, h, w, C)), or declared per layer
(``"nchw"``, ``"nhwc"`` or a function such as :func:`tokens_to_nchw` for a ViT's tokens).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("layercam", "gradcam", "gradcam++")
FUSIONS = ("max", "mean")
LAYOUTS = ("nchw", "nhwc")
# How a hooked layer's output becomes (N, channels, h, w): a name from LAYOUTS, or a function
# applied to the output and to its gradient alike (pytorch-grad-cam's ``reshape_transform``).
Layout = Union[str, Callable[[Tensor], Tensor]]


def compute_cams(
    model: nn.Module,
    images: Tensor,
    class_ids: Sequence[Sequence[int]],
    layers: Sequence[str] | str,
    method: str = "layercam",
    layouts: Mapping[str, Layout] | None = None,
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
            Each layer's output must be a (N, channels, h, w) tensor, or become one by its layout.
        method: ``"layercam"``, ``"gradcam"`` or ``"gradcam++"``.
        layouts: per layer (keyed by the name as passed, or its module name), how its output is
            laid out: ``"nchw"``, ``"nhwc"`` (permuted to NCHW), or a function turning the output
            into (N, channels, h, w), applied to the output and to its gradient alike (so it must
            only select and rearrange, as :func:`tokens_to_nchw` does). Layers without an entry
            get :func:`detect_layout`'s answer.

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
            logits, a layer whose output is not (N, C, h, w) after its layout or that is run twice
            per forward (the message names an enclosing module to hook instead) or that does not
            influence the logits, or a model whose parameters are inference tensors.
    """
    return compute_cam_sets(model, images, class_ids, {method: layers}, layouts)[method]


def compute_cam_sets(
    model: nn.Module,
    images: Tensor,
    class_ids: Sequence[Sequence[int]],
    requests: Mapping[str, Sequence[str] | str],
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, dict[str, list[Tensor]]]:
    """:func:`compute_cams` for several methods, each at its own layers, from the same forward and
    backward passes (the cost :func:`compute_cams` describes for the union of the layers): the
    three methods need only the activations and their gradients, so LayerCAM at stages 3-5 plus
    Grad-CAM and Grad-CAM++ at stage 5 cost what LayerCAM alone costs.

    Args:
        requests: ``{method: layers}``, e.g. ``{"layercam": ["stage3", "stage5"], "gradcam": ["stage5"]}``.
        model, images, class_ids, layouts: as in :func:`compute_cams`.

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
    converters = _layout_converters(model, module_names, layouts)
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
            recorded, logits = _forward_with_hooks(model, batch.detach(), {name: converters[name] for name in methods_at})
            for key, group_maps in _maps_for_all_classes(recorded, logits, [classes[n] for n in members], methods_at).items():
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


def detect_layout(model: nn.Module, module_name: str) -> str:
    """How ``model``'s module ``module_name`` lays out a 4-D output, as far as its type tells.

    ``"nhwc"`` (channels last) for: torchvision's Swin blocks and patch merging (V1 and V2) and
    every module inside them (they run on (N, h, w, C)); a torchvision ``Permute`` to (0, 2, 3, 1);
    an ``nn.LayerNorm`` over one dimension (not torchvision's ``LayerNorm2d``, which permutes
    around its norm) and an ``nn.Linear``, which act on the last dimension, so that one holds the
    channels; an ``nn.Sequential`` whose last module is one of these (Swin's ``features.*`` stages,
    its stem and its final ``norm``). ``"nchw"`` for anything else: a module this cannot recognise
    (say, an activation after a channels-last ``Linear``) needs its layout declared.
    """
    from torchvision.models.convnext import LayerNorm2d
    from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2, SwinTransformerBlock
    from torchvision.ops.misc import Permute

    swin_parts = (SwinTransformerBlock, PatchMerging, PatchMergingV2)  # SwinTransformerBlockV2 subclasses the block
    parts = module_name.split(".")
    if any(isinstance(model.get_submodule(".".join(parts[:depth])), swin_parts) for depth in range(1, len(parts))):
        return "nhwc"
    module = model.get_submodule(module_name)
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    if isinstance(module, swin_parts):
        return "nhwc"
    if isinstance(module, Permute):
        return "nhwc" if list(module.dims) == [0, 2, 3, 1] else "nchw"
    if isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm2d) and len(module.normalized_shape) == 1:
        return "nhwc"
    return "nhwc" if isinstance(module, nn.Linear) else "nchw"


def tokens_to_nchw(tokens: Tensor, prefix_tokens: int = 1, grid: tuple[int, int] | None = None) -> Tensor:
    """A vision transformer's tokens (N, prefix_tokens + h * w, C) as a (N, C, h, w) map: the
    ``prefix_tokens`` leading tokens (the class token; more for register tokens) are dropped and the
    patch tokens laid on their grid, square unless ``grid=(h, w)`` is given. A ``reshape_transform``
    for torchvision's ViT (``functools.partial`` sets the options); it only selects and rearranges,
    so it applies to gradients as to activations.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens_to_nchw needs (N, tokens, channels) tokens, got shape {tuple(tokens.shape)}")
    patches = tokens[:, prefix_tokens:]
    count = patches.shape[1]
    if grid is None:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} patch tokens (after {prefix_tokens} prefix tokens) make no square grid; pass grid=(h, w)")
        grid = (side, side)
    height, width = grid
    if height * width != count:
        raise ValueError(f"grid {tuple(grid)} holds {height * width} patch tokens, the layer gives {count} (after {prefix_tokens} prefix tokens)")
    return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)


def _nhwc_to_nchw(output: Tensor) -> Tensor:
    return output.permute(0, 3, 1, 2)


def _layout_converters(model: nn.Module, module_names: Mapping[str, str],
                       layouts: Mapping[str, Layout] | None) -> dict[str, Callable[[Tensor], Tensor] | None]:
    """Per hooked module name, the function turning its output and gradients into (N, C, h, w);
    None where they already are. ``layouts`` is keyed by requested names or module names."""
    layouts = dict(layouts or {})
    unknown = [key for key in layouts if key not in module_names and key not in module_names.values()]
    if unknown:
        raise ValueError(f"layouts given for layers that are not requested: {', '.join(map(repr, unknown))}")
    declared: dict[str, list[Layout]] = {}
    for requested, module_name in module_names.items():
        for key in (requested, module_name):
            if key in layouts and not any(layouts[key] is seen or layouts[key] == seen for seen in declared.get(module_name, [])):
                declared.setdefault(module_name, []).append(layouts[key])
    converters: dict[str, Callable[[Tensor], Tensor] | None] = {}
    for module_name in dict.fromkeys(module_names.values()):
        given = declared.get(module_name, [])
        if len(given) > 1:
            raise ValueError(f"layer {module_name!r} is given {len(given)} different layouts (under its alias and its module name)")
        layout = given[0] if given else detect_layout(model, module_name)
        if callable(layout):
            converters[module_name] = layout
        elif layout in LAYOUTS:
            converters[module_name] = _nhwc_to_nchw if layout == "nhwc" else None
        else:
            raise ValueError(f"unknown layout {layout!r} for layer {module_name!r}; expected 'nchw', 'nhwc' or a function "
                             "returning (N, channels, h, w)")
    return converters


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

    Normalised before upsampled: on maps at their layers' resolutions (as :func:`compute_cams`
    gives them) that is not what ``wsss cams`` writes, which upsamples first (bilinear samples
    miss a coarse map's peak, tanh and quantiles do not commute with interpolation). Maps already
    at ``size`` are not resized, so both orders agree there: :func:`cams_at_image_size` (and
    :class:`CAM`) give the CLI's maps.
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


def view_of(images: Tensor, scale: float = 1.0, flipped: bool = False, min_side: int = 1) -> Tensor:
    """A test-time view of a (N, 3, H, W) batch: resized by ``scale`` (bilinear, ``align_corners=False``;
    sides rounded and at least ``min_side``, below which a classifier has no position left at its
    deepest layer) and flipped left-right if ``flipped``; the batch itself at scale 1 unflipped."""
    height, width = int(images.shape[-2]), int(images.shape[-1])
    size = (max(min_side, round(height * scale)), max(min_side, round(width * scale)))
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images.flip(-1) if flipped else images


class ImageCams(NamedTuple):
    """One image's maps at its size: ``fused`` (K, H, W) in [0, 1]; ``layers`` one (K, H, W) map per
    layer, normalised (before any tanh), as ``wsss cams --save-layers`` stores them."""

    fused: Tensor
    layers: list[Tensor]


def cams_at_image_size(views: Sequence[Sequence[Tensor]], size: tuple[int, int], tanh_scaled: Sequence[bool], *,
                       flipped: Sequence[bool] | None = None, scales: Sequence[float] | None = None,
                       view_weighting: str = "area", gamma: float = 2.0, peak_quantile: float = 1.0,
                       fusion: str = "max") -> ImageCams:
    """One image's CAMs exactly as ``wsss cams`` computes them, from its raw per-layer maps.

    In this order: every layer's maps are upsampled to ``size`` and summed over the views
    (:func:`accumulate_multiscale`, weighted by ``view_weighting``), then normalised
    (:func:`normalize_maps` with ``peak_quantile``), then tanh-scaled where ``tanh_scaled`` and
    fused (:func:`fuse_cams`, ``fusion``). With one view (the default) ``views`` is
    ``[[raw map of layer l, ...]]``, e.g. ``[[maps[l][n] for l in layers]]`` from :func:`compute_cams`.

    Args:
        views: ``views[v][l]``: the (K, h, w) raw map of layer ``l`` on view ``v``.
        flipped, scales: per view, as :func:`accumulate_multiscale` (default: one unflipped view).
    """
    flipped = [False] * len(views) if flipped is None else flipped
    summed = accumulate_multiscale(views, flipped, size, scales, view_weighting)
    # Each layer normalised once, for its own map and for the fusion: a normalised map's maximum is
    # exactly 1 (or it is all 0), so fuse_cams' own division by the maximum leaves it bit for bit as
    # it is, and the quantile (two kthvalue passes per layer) is not computed twice.
    normalized = [normalize_maps(maps, peak_quantile=peak_quantile) for maps in summed]
    return ImageCams(fuse_cams(normalized, size, tanh_scaled, gamma, fusion=fusion), normalized)


@dataclass(frozen=True)
class CamOutput:
    """What a :class:`CAM` call gives, per image ``n`` of the batch: ``classes[n]`` the class indices
    explained, ``fused[n]`` their (K_n, H, W) fused maps in [0, 1] at the input size, and
    ``layers[name][n]`` each target layer's normalised (K_n, H, W) map (before any tanh)."""

    classes: list[list[int]]
    fused: list[Tensor]
    layers: dict[str, list[Tensor]]


class CAM:
    """Class activation maps of any classifier at its target layers, fused as ``wsss cams`` fuses them.

    ``cam = LayerCAM(model, target_layers=[model.layer3, model.layer4])`` then
    ``out = cam(images, targets=[[3], [1, 7]])``: ``out.fused[n]`` is image ``n``'s (K_n, H, W)
    maps, ``out.layers["layer4"][n]`` one layer's. The maps are the very ones ``wsss cams`` writes
    for the same options (:func:`cams_at_image_size` does the upsampling, normalisation and fusion
    of both); the raw maps come from :func:`compute_cams`: one forward per group of images with
    the same class count, one activation-gradient backward per class slot.

    Args:
        model: maps (N, 3, H, W) images to logits (N, C); run in eval mode for each call.
        target_layers: modules of ``model`` or their names (``model.named_modules()``; our
            classifier's ``stage1``..``stage5`` too); outputs are keyed by the names.
        reshape_transform: a function turning every target layer's output into (N, C, h, w)
            (applied to the gradients alike), e.g. :func:`tokens_to_nchw` for a ViT; layers given
            in ``layouts`` keep theirs. Without either, :func:`detect_layout` decides.
        method: ``"layercam"``, ``"gradcam"`` or ``"gradcam++"`` (:class:`LayerCAM`,
            :class:`GradCAM` and :class:`GradCAMPlusPlus` fix it).
        layouts: per target layer (module or name): ``"nchw"``, ``"nhwc"`` or a function.
        scaled_layers: target layers whose normalised map gets ``tanh(gamma * m)`` before the
            fusion (the paper: the shallow ones; ``wsss cams --scaled``). ``gamma``, ``fusion``
            (``"max"`` or ``"mean"``) and ``peak_quantile``: as ``--gamma``, ``--fusion`` and
            ``--peak-quantile``.
        scales, flip, view_weighting: test-time views, as ``--scales``, ``--flip`` and
            ``--view-weighting`` (default: the image alone).
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str],
                 reshape_transform: Callable[[Tensor], Tensor] | None = None, *, method: str = "layercam",
                 layouts: Mapping[nn.Module | str, Layout] | None = None, scaled_layers: Sequence[nn.Module | str] = (),
                 gamma: float = 2.0, fusion: str = "max", peak_quantile: float = 1.0,
                 scales: Sequence[float] = (1.0,), flip: bool = False, view_weighting: str = "area"):
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(METHODS)}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
        if view_weighting not in VIEW_WEIGHTINGS:
            raise ValueError(f"unknown view weighting {view_weighting!r}; expected one of {', '.join(VIEW_WEIGHTINGS)}")
        if not 0 < peak_quantile <= 1:
            raise ValueError(f"peak_quantile must be in (0, 1], got {peak_quantile!r}")
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {list(scales)!r}")
        if isinstance(target_layers, (str, nn.Module)):
            target_layers = [target_layers]
        self.model, self.method = model, method
        self.layer_names = [self._name_of(layer) for layer in target_layers]
        if not self.layer_names:
            raise ValueError("no target layers given")
        resolve_layers(model, self.layer_names)  # unknown names fail now, with the valid ones
        scaled = {self._name_of(layer) for layer in scaled_layers}
        unknown = sorted(scaled - set(self.layer_names))
        if unknown:
            raise ValueError(f"scaled layers {unknown} are not among the target layers {self.layer_names}")
        self.tanh_scaled = [name in scaled for name in self.layer_names]
        declared = {self._name_of(layer): layout for layer, layout in (layouts or {}).items()}
        default = {} if reshape_transform is None else {name: reshape_transform for name in self.layer_names if name not in declared}
        self.layouts = {**default, **declared}
        self.gamma, self.fusion, self.peak_quantile = gamma, fusion, peak_quantile
        self.views = [(float(scale), flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]
        self.view_weighting = view_weighting
        self.min_side = int(getattr(model, "min_input_side", 1))

    def _name_of(self, layer: nn.Module | str) -> str:
        if isinstance(layer, str):
            return layer
        for name, module in self.model.named_modules():
            if module is layer and name:
                return name
        raise ValueError(f"target layer {type(layer).__name__} is not a submodule of the model")

    def __call__(self, images: Tensor, targets: Sequence[int | Sequence[int]] | None = None) -> CamOutput:
        """Maps of ``targets`` (per image: a class index or a list of them, in the logits' order;
        None: each image's highest-scoring class, at the cost of one forward without gradients)
        on the (N, 3, H, W) batch ``images``, at its size."""
        if images.ndim != 4:
            raise ValueError(f"images must be a (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        classes = self._classes(images, targets)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        views = [compute_cams(self.model, view_of(images, scale, flipped, self.min_side), classes, self.layer_names,
                              self.method, self.layouts) for scale, flipped in self.views]
        fused: list[Tensor] = []
        layers: dict[str, list[Tensor]] = {name: [] for name in self.layer_names}
        for n in range(len(classes)):
            image = cams_at_image_size([[view[name][n] for name in self.layer_names] for view in views], size, self.tanh_scaled,
                                       flipped=[flipped for _, flipped in self.views], scales=[scale for scale, _ in self.views],
                                       view_weighting=self.view_weighting, gamma=self.gamma, peak_quantile=self.peak_quantile,
                                       fusion=self.fusion)
            fused.append(image.fused)
            for name, maps in zip(self.layer_names, image.layers):
                layers[name].append(maps)
        return CamOutput(classes, fused, layers)

    def _classes(self, images: Tensor, targets: Sequence[int | Sequence[int]] | None) -> list[list[int]]:
        if targets is None:
            with torch.no_grad():
                _, logits = _forward_with_hooks(self.model, images, {})
            return [[int(c)] for c in logits.argmax(dim=1)]
        if len(targets) != images.shape[0]:
            raise ValueError(f"targets has {len(targets)} entries for a batch of {images.shape[0]} images; give one per image")
        classes = []
        for n, target in enumerate(targets):
            try:
                classes.append([operator.index(target)])
            except TypeError:
                classes.append(_as_index_list(target, n, "targets"))
        return classes


class LayerCAM(CAM):
    """:class:`CAM` with LayerCAM maps."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str],
                 reshape_transform: Callable[[Tensor], Tensor] | None = None, **options):
        super().__init__(model, target_layers, reshape_transform, method="layercam", **options)


class GradCAM(CAM):
    """:class:`CAM` with Grad-CAM maps."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str],
                 reshape_transform: Callable[[Tensor], Tensor] | None = None, **options):
        super().__init__(model, target_layers, reshape_transform, method="gradcam", **options)


class GradCAMPlusPlus(CAM):
    """:class:`CAM` with Grad-CAM++ maps."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str],
                 reshape_transform: Callable[[Tensor], Tensor] | None = None, **options):
        super().__init__(model, target_layers, reshape_transform, method="gradcam++", **options)


class _Recorded(NamedTuple):
    """A hooked layer's output in one forward: ``output`` as the module gave it (the autograd input
    gradients are taken against), ``nchw`` its detached (N, C, h, w) form, ``to_nchw`` the function
    that gave it, for the gradients (None: the output already is NCHW)."""

    output: Tensor
    nchw: Tensor
    to_nchw: Callable[[Tensor], Tensor] | None


_TOKENS_HINT = ("; (N, tokens, channels) tokens, as a vision transformer's, need a reshape_transform (or a layouts entry) "
                "laying them on their grid, e.g. wsss.cams.tokens_to_nchw")


def _as_nchw(name: str, output: Tensor, to_nchw: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The (N, C, h, w) form of a hooked layer's (detached) output; ValueError naming the layer otherwise."""
    shape = tuple(output.shape)
    if to_nchw is None or to_nchw is _nhwc_to_nchw:
        if output.ndim != 4:
            raise ValueError(f"layer {name!r} must output a (N, channels, h, w) tensor (or (N, h, w, channels) where its layout "
                             f"is nhwc), got {shape}{_TOKENS_HINT if output.ndim == 3 else ''}")
        return output if to_nchw is None else to_nchw(output)
    converted = to_nchw(output)
    if not isinstance(converted, Tensor) or converted.ndim != 4 or converted.shape[0] != shape[0]:
        got = tuple(converted.shape) if isinstance(converted, Tensor) else type(converted).__name__
        raise ValueError(f"the reshape_transform of layer {name!r} turned its {shape} output into {got}; "
                         f"it must give (N, channels, h, w) with N = {shape[0]}")
    return converted


def _forward_with_hooks(model: nn.Module, images: Tensor,
                        converters: Mapping[str, Callable[[Tensor], Tensor] | None]) -> tuple[dict[str, _Recorded], Tensor]:
    """One forward pass recording the outputs of the modules named in ``converters`` as autograd
    inputs, each with its (N, C, h, w) form by its converter (see :class:`_Recorded`).

    The model runs in eval mode and its parameters are frozen for the pass, so autograd records
    only what follows the first hooked layer; hooks, training and ``requires_grad`` flags are
    restored before returning or raising.
    """
    modules = dict(model.named_modules())
    recorded: dict[str, _Recorded] = {}
    runs = dict.fromkeys(converters, 0)

    def make_hook(name: str, to_nchw: Callable[[Tensor], Tensor] | None):
        def hook(module: nn.Module, inputs: tuple, output: object) -> Tensor | None:
            runs[name] += 1
            if runs[name] > 1:  # refused after the pass, when the number of runs is known
                return None
            if not isinstance(output, Tensor):
                raise ValueError(f"layer {name!r} must output a (N, channels, h, w) tensor, got {type(output).__name__}")
            # Upstream of the first hooked layer nothing requires grad; start the graph here.
            activation = output if output.requires_grad else output.detach().requires_grad_()
            with torch.no_grad():
                nchw = _as_nchw(name, activation.detach(), to_nchw)
            recorded[name] = _Recorded(activation, nchw, to_nchw)
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
        for name, to_nchw in converters.items():
            handles.append(modules[name].register_forward_hook(make_hook(name, to_nchw)))
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        for module, training in modes:
            module.training = training
    repeated = {name: count for name, count in runs.items() if count > 1}
    if repeated:
        name, count = next(iter(repeated.items()))
        raise ValueError(f"layer {name!r} runs {count} times per forward pass (a module reused, as a ResNet block reuses its "
                         f"ReLU), so no single output of it is explained; hook a module that runs once{_enclosing(name)}")
    missing = [name for name in converters if name not in recorded]
    if missing:
        raise ValueError(f"layers {missing} did not run during the forward pass")
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape (N, C) = ({images.shape[0]}, C), got {shape}")
    return recorded, logits


def _enclosing(module_name: str) -> str:
    """`` such as its enclosing block 'layer4.2' (or 'layer4')`` for ``layer4.2.relu``: modules
    that contain a reused one typically run once."""
    parts = module_name.split(".")
    parents = [".".join(parts[:depth]) for depth in range(len(parts) - 1, 0, -1)][:2]
    if not parents:
        return ""
    return f", such as its enclosing block {parents[0]!r}" + (f" (or {parents[1]!r})" if len(parents) > 1 else "")


def _maps_for_all_classes(
    recorded: dict[str, _Recorded], logits: Tensor, classes: list[list[int]], methods_at: dict[str, list[str]]
) -> dict[tuple[str, str], list[Tensor]]:
    """One backward per class slot k (the sum over images of their k-th class score); every method
    asked for at a layer is computed from that layer's gradients, laid out as its activations
    (N, C, h, w). Keys: (method, module name)."""
    num_classes = logits.shape[1]
    for n, ids in enumerate(classes):
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"class index {bad[0]} of image {n} is outside the model's {num_classes} logits")
    names = list(recorded)
    inputs = [recorded[name].output for name in names]
    out = {
        (method, name): [recorded[name].nchw.new_zeros((len(ids), *recorded[name].nchw.shape[2:])) for ids in classes]
        for name in names for method in methods_at[name]
    }
    slots = max((len(ids) for ids in classes), default=0)
    if slots and not logits.requires_grad:
        raise ValueError("the logits do not depend on the hooked layers (does the model detach its features?)")
    for k in range(slots):
        rows = [n for n, ids in enumerate(classes) if len(ids) > k]
        score = logits[rows, [classes[n][k] for n in rows]].sum()
        grads = torch.autograd.grad(score, inputs, retain_graph=k < slots - 1, allow_unused=True)
        with torch.no_grad():
            for name, grad in zip(names, grads):
                if grad is None:
                    raise ValueError(f"layer {name!r} does not influence the logits; no CAM can be computed there")
                activation, to_nchw = recorded[name].nchw, recorded[name].to_nchw
                if to_nchw is not None:
                    grad = to_nchw(grad)
                if len(rows) < activation.shape[0]:
                    index = torch.tensor(rows, device=grad.device)
                    activation, grad = activation.index_select(0, index), grad.index_select(0, index)
                for method in methods_at[name]:
                    maps = cam_from_gradients(activation, grad, method)
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


def _as_index_list(ids: Sequence[int], image: int, what: str = "class_ids") -> list[int]:
    try:
        return [operator.index(c) for c in ids]
    except TypeError as exc:
        raise ValueError(f"{what}[{image}] must be a sequence of integer class indices, got {ids!r}") from exc


def _natural_key(name: str) -> list[tuple[int, str]]:
    """Sort ``features.10`` after ``features.9``."""
    return [(int(part), "") if part.isdigit() else (-1, part) for part in name.split(".")]
