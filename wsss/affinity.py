"""Inter-pixel affinities and the random walk that propagates CAMs along them (PSA, Ahn & Kwak
CVPR 2018; IRN, Ahn, Cho & Kwak CVPR 2019). Pure tensor math: no Lightning, no files.

On a grid of ``h x w`` positions (a feature map at some stride), each position is paired with its
neighbours at the *offsets* of :func:`neighbour_offsets`: every (dy, dx) with dy^2 + dx^2 < r^2 on
one side of the origin (dy > 0, or dy = 0 and dx > 0), so each unordered pair within the radius is
counted once. Per-pair quantities are stored as (P, h, w) tensors: entry [o, y, x] belongs to the
pair ((y, x), (y + dy_o, x + dx_o)); pairs leaving the grid are zero (and never labelled).

- :func:`affinity_labels`: from a seed map (0 background, 1..20 classes, 255 unknown), the pairs
  that are background-background, same-class foreground, or of different labels; pairs with an
  unknown end are not labelled.
- :func:`pair_affinities`: a = exp(-mean_c |f_i - f_j|) of a feature map (PSA's AffinityNet).
- :func:`boundary_affinities`: a = 1 - max of a boundary map over IRN's path from i to j (the
  cells within one cell of the segment, :func:`path_points`): no boundary between two cells,
  however different they look, means high affinity.
- :func:`boundary_walk`: IRN's ``propagate_to_edge``, the maps times (1 - boundary) walked along
  those affinities; :func:`normalise_walked` divides the result by one global maximum (IRN).
- :func:`affinity_loss`: PSA's balanced cross-entropy, bg/4 + fg/4 + neg/2 of the three classes'
  mean losses.
- :func:`random_walk`: ``iterations`` steps of x <- x T with T = A / (column sums of A), where A is
  the symmetric matrix of a^beta with ones on its diagonal (PSA's transition matrix); applied as a
  sparse operation on the offsets, so memory grows with h * w * P, never (h * w)^2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BYTES_PER_VALUE = 4  # float32


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) of every neighbour within ``radius`` (dy^2 + dx^2 < radius^2) on one side of the
    origin: dy > 0, or dy = 0 and dx > 0. Radius 5 gives 34 offsets (PSA's and IRN's radius)."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2 (1 leaves no neighbour), got {radius}")
    return [(dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
            if dy * dy + dx * dx < radius * radius and (dy > 0 or dx > 0)]


def _shifted(values: Tensor, dy: int, dx: int, fill: float = 0.0) -> Tensor:
    """``values[..., y + dy, x + dx]`` at [..., y, x] (``fill`` where that leaves the grid)."""
    h, w = values.shape[-2:]
    out = torch.full_like(values, fill)
    ys, yt = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h - max(dy, 0))
    xs, xt = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w - max(dx, 0))
    out[..., yt, xt] = values[..., ys, xs]
    return out


def inside(offsets: list[tuple[int, int]], size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(P, h, w) bool: whether each pair's second end lies on the grid."""
    ones = torch.ones(size, dtype=torch.bool, device=device)
    return torch.stack([_shifted(ones, dy, dx, fill=False) for dy, dx in offsets])


def affinity_labels(seeds: Tensor, offsets: list[tuple[int, int]], ignore_index: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """Pair labels of a seed map ``seeds`` (..., h, w) of label values (0 background, 255 unknown):
    three (..., P, h, w) bool tensors ``(background_pairs, foreground_pairs, negative_pairs)``:
    both ends background; both ends the same class > 0; both ends known and different."""
    seeds = seeds.long()
    ends = torch.stack([_shifted(seeds, dy, dx, fill=ignore_index) for dy, dx in offsets], dim=-3)
    here = seeds.unsqueeze(-3).expand_as(ends)
    known = (here != ignore_index) & (ends != ignore_index)
    same = known & (here == ends)
    return same & (here == 0), same & (here > 0), known & (here != ends)


def pair_affinities(features: Tensor, offsets: list[tuple[int, int]]) -> Tensor:
    """(..., P, h, w) affinities exp(-mean_c |f(i) - f(j)|) of features (..., C, h, w); pairs that
    leave the grid get 0."""
    values = []
    size = features.shape[-2:]
    for dy, dx in offsets:
        distance = (features - _shifted(features, dy, dx)).abs().mean(dim=-3)
        values.append(torch.exp(-distance))
    valid = inside(offsets, tuple(size), features.device)
    return torch.stack(values, dim=-3) * valid


def path_points(offset: tuple[int, int]) -> list[tuple[int, int]]:
    """IRN's path from (0, 0) to ``offset`` (``PathIndex.get_all_dir_paths``): every cell of the
    box spanned by the two ends whose centre lies less than one cell from the segment between
    them, both ends included. A diagonal step's path holds the cells beside it too, so a walk
    cannot slip between two diagonally adjacent boundary cells."""
    dy, dx = offset
    length_sq = dy * dy + dx * dx
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 < length_sq]


def boundary_affinities(boundaries: Tensor, offsets: list[tuple[int, int]]) -> Tensor:
    """(..., P, h, w) affinities 1 - max(boundary on the path from i to j) of a boundary map
    (..., h, w) in [0, 1]; pairs that leave the grid get 0 (IRN pads the map with boundary 1)."""
    shifted: dict[tuple[int, int], Tensor] = {}  # paths share cells: each shift is made once
    values = []
    for offset in offsets:
        cells = path_points(offset)
        for cell in cells:
            if cell not in shifted:
                shifted[cell] = _shifted(boundaries, *cell, fill=1.0)
        values.append(1 - torch.stack([shifted[cell] for cell in cells]).amax(dim=0))
    return torch.stack(values, dim=-3) * inside(offsets, tuple(boundaries.shape[-2:]), boundaries.device)


def boundary_walk(maps: Tensor, boundary: Tensor, *, radius: int = 5, beta: float = 10.0, steps: int = 256,
                  edge_product: bool = True) -> Tensor:
    """IRN's ``propagate_to_edge``: maps (K, h, w) times (1 - boundary), then ``steps`` steps of the
    random walk along the boundary affinities (:func:`boundary_affinities`) of the pairs within
    ``radius`` raised to ``beta``. ``boundary`` (h, w) in [0, 1] on the same grid. IRN squares its
    transition matrix 8 times: 2^8 = 256 steps, here applied one sparse step at a time.
    ``edge_product=False`` walks the maps as they are (a deviation from IRN, measured in the README)."""
    if maps.shape[-2:] != boundary.shape[-2:]:
        raise ValueError(f"maps are {tuple(maps.shape[-2:])} but the boundary map is {tuple(boundary.shape[-2:])}")
    offsets = neighbour_offsets(radius)
    start = maps * (1 - boundary) if edge_product else maps
    return random_walk(start, boundary_affinities(boundary, offsets), offsets, beta, steps)


def affinities_of(output: Tensor, offsets: list[tuple[int, int]], kind: str) -> Tensor:
    """AffinityNet's output (N, C, h, w) as pair affinities (N, P, h, w): ``embedding`` (PSA: the
    C channels' L1 distances) or ``boundary`` (IRN: channel 0 is a boundary logit)."""
    if kind == "boundary":
        return boundary_affinities(torch.sigmoid(output[:, 0].float()), offsets)
    if kind == "embedding":
        return pair_affinities(output.float(), offsets)
    raise ValueError(f"affinity kind {kind!r} unknown; choose from boundary, embedding")


def affinity_loss(affinities: Tensor, labels: tuple[Tensor, Tensor, Tensor], eps: float = 1e-5) -> dict[str, Tensor]:
    """PSA's loss: mean -log(a) over background pairs and over foreground pairs, mean
    -log(1 - a) over negative pairs; ``total`` = bg/4 + fg/4 + neg/2 (a class without pairs
    adds 0). Returns the three parts and the total."""
    background, foreground, negative = labels
    parts = {}
    for name, mask, loss in (("background", background, -torch.log(affinities + eps)),
                             ("foreground", foreground, -torch.log(affinities + eps)),
                             ("negative", negative, -torch.log(1 + eps - affinities))):
        count = mask.sum()
        parts[name] = (loss * mask).sum() / count.clamp(min=1)
    parts["total"] = parts["background"] / 4 + parts["foreground"] / 4 + parts["negative"] / 2
    return parts


def random_walk(maps: Tensor, affinities: Tensor, offsets: list[tuple[int, int]], beta: float = 8.0, iterations: int = 256) -> Tensor:
    """Propagate ``maps`` (K, h, w) along ``affinities`` (P, h, w) for ``iterations`` steps of
    x <- x T (module docstring): each step replaces every position's value by the average of its
    own and its neighbours', weighted by a^beta (the position itself by 1). Returns (K, h, w)."""
    weights = affinities.clamp(min=0) ** beta
    # Each pair (i, j = i + o) weighs in both directions: j's value reaches i with weight w_o(i),
    # and i's reaches j, stored at j as the offset's weight shifted back by -o.
    back = torch.stack([_shifted(weights[o], -dy, -dx) for o, (dy, dx) in enumerate(offsets)])
    degree = 1 + weights.sum(0) + back.sum(0)
    x = maps
    for _ in range(iterations):
        total = x.clone()
        for o, (dy, dx) in enumerate(offsets):
            total += weights[o] * _shifted(x, dy, dx) + back[o] * _shifted(x, -dy, -dx)
        x = total / degree
    return x


def random_walk_bytes(size: tuple[int, int], num_offsets: int, num_maps: int, feature_channels: int) -> int:
    """Peak bytes the random walk of one image holds on a grid of ``size``: the features, the
    affinities and their weights both ways, the degrees, and the maps with two working copies."""
    cells = size[0] * size[1]
    return BYTES_PER_VALUE * cells * (feature_channels + 3 * num_offsets + 1 + 3 * num_maps + 2)


def to_grid(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(K, H, W) image-size maps averaged onto a (K, h, w) grid (each cell the mean of its pixels)."""
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    return F.adaptive_avg_pool2d(maps.unsqueeze(0), size)[0]


def to_image(maps: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """(K, h, w) grid maps upsampled by ``stride`` (bilinear) and cropped to the image's (K, H, W),
    as IRN's and PSA's inference do: cell (i, j) covers pixels [stride*i, stride*(i+1))."""
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    up = F.interpolate(maps.unsqueeze(0), scale_factor=stride, mode="bilinear", align_corners=False)[0]
    if up.shape[-2] < size[0] or up.shape[-1] < size[1]:
        raise ValueError(f"a {tuple(maps.shape[-2:])} grid at stride {stride} does not cover a {size} image")
    return up[:, :size[0], :size[1]]


NORMALISATIONS = ("global", "per_class")


def normalise_walked(maps: Tensor, mode: str = "global") -> Tensor:
    """Walked maps (K, H, W) scaled into [0, 1]: ``global`` divides every class by the one maximum
    over all of them (IRN's ``make_sem_seg_labels``), so a class the walk drained stays low;
    ``per_class`` divides each class by its own maximum. An all-zero map stays zero."""
    if mode not in NORMALISATIONS:
        raise ValueError(f"normalisation {mode!r} unknown; choose from {', '.join(NORMALISATIONS)}")
    if maps.shape[0] == 0:
        return maps
    peak = maps.amax() if mode == "global" else maps.flatten(1).amax(dim=1)[:, None, None]
    return torch.where(peak > 0, maps / peak.clamp(min=1e-12), torch.zeros_like(maps)).clamp(0, 1)
