"""Affinity math (wsss.affinity) against hand-computed cases and dense matrices; AffinityNet learning
to tell two textures apart."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from wsss.affinity import (affinity_labels, affinity_loss, neighbour_offsets, pair_affinities, random_walk, random_walk_bytes,
                           to_grid, to_image)


def test_offsets_are_each_unordered_pair_within_the_radius_once():
    assert neighbour_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    offsets = neighbour_offsets(5)
    assert len(offsets) == 34  # the 68 points of the radius-5 disk but the origin, halved
    disk = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert set(offsets) | {(-dy, -dx) for dy, dx in offsets} == disk and not set(offsets) & {(-dy, -dx) for dy, dx in offsets}
    with pytest.raises(ValueError):
        neighbour_offsets(1)


def brute_force_pair_counts(seeds: np.ndarray, radius: int) -> tuple[int, int, int]:
    """Every unordered pair of pixels within the radius, by two loops: (bg, fg, negative)."""
    h, w = seeds.shape
    pixels = list(itertools.product(range(h), range(w)))
    counts = [0, 0, 0]
    for (y1, x1), (y2, x2) in itertools.combinations(pixels, 2):
        if (y1 - y2) ** 2 + (x1 - x2) ** 2 >= radius ** 2:
            continue
        a, b = seeds[y1, x1], seeds[y2, x2]
        if a == 255 or b == 255:
            continue
        if a == b:
            counts[0 if a == 0 else 1] += 1
        else:
            counts[2] += 1
    return tuple(counts)


def test_affinity_labels_count_the_pairs_a_hand_count_gives():
    # A row [0, 0, 1] at radius 2: (0, 1) background-background, (1, 2) negative; nothing else.
    bg, fg, neg = affinity_labels(torch.tensor([[0, 0, 1]]), neighbour_offsets(2))
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (1, 0, 1)
    # Two regions, left background, right class 3, one unknown pixel: 4x4 at radius 2. By hand:
    # 24 pairs of 4-neighbours + 18 diagonal pairs = 42 pairs; the unknown pixel (1, 1) takes 8 away.
    # The 7 known background pixels make 11 pairs, the 8 of class 3 make 4 + 6 + 6 = 16, which
    # leaves 34 - 27 = 7 across the boundary.
    seeds = np.array([[0, 0, 3, 3]] * 4)
    seeds[1, 1] = 255
    counts = tuple(int(m.sum()) for m in affinity_labels(torch.from_numpy(seeds), neighbour_offsets(2)))
    assert sum(counts) == 42 - 8
    assert counts == brute_force_pair_counts(seeds, 2) == (11, 16, 7)
    rng = np.random.default_rng(0)
    for radius in (2, 3, 5):
        seeds = rng.choice([0, 1, 7, 255], size=(7, 9))
        counts = tuple(int(m.sum()) for m in affinity_labels(torch.from_numpy(seeds), neighbour_offsets(radius)))
        assert counts == brute_force_pair_counts(seeds, radius), radius


def test_pair_affinities_are_exp_of_the_mean_l1_distance():
    features = torch.tensor([[[0.0, 1.0, 3.0]], [[0.0, 1.0, 1.0]]])  # C=2, 1x3
    a = pair_affinities(features, [(0, 1)])
    np.testing.assert_allclose(a[0, 0].numpy(), [math.exp(-(1 + 1) / 2), math.exp(-(2 + 0) / 2), 0.0], rtol=1e-6)  # last leaves the grid


def test_affinity_loss_is_psas_balanced_cross_entropy():
    a = torch.tensor([[[0.9, 0.5, 0.2]]])
    bg, fg, neg = torch.tensor([[[True, False, False]]]), torch.tensor([[[False, True, False]]]), torch.tensor([[[False, False, True]]])
    parts = affinity_loss(a, (bg, fg, neg), eps=0.0)
    expected = -math.log(0.9) / 4 - math.log(0.5) / 4 - math.log(0.8) / 2
    assert parts["total"].item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros_like(bg)
    assert affinity_loss(a, (bg, empty, empty), eps=0.0)["total"].item() == pytest.approx(-math.log(0.9) / 4, rel=1e-6)


def dense_transition(affinities: np.ndarray, offsets, size, beta: float) -> np.ndarray:
    """PSA's matrix: A_ij = a_ij^beta for pairs, 1 on the diagonal, symmetric; T = A / column sums."""
    h, w = size
    n = h * w
    a = np.eye(n)
    for o, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + x + dx
                    a[i, j] = a[j, i] = affinities[o, y, x] ** beta
    return a / a.sum(axis=0, keepdims=True)


def test_random_walk_on_a_chain_by_hand_and_as_exact_transition_powers():
    # Three nodes in a row, all affinities 1, beta 1: A = [[1,1,0],[1,1,1],[0,1,1]], column sums
    # 2, 3, 2: one step from [1, 0, 0] gives [1/2, 1/3, 0].
    offsets = [(0, 1)]
    ones = torch.ones(1, 1, 3)
    step = random_walk(torch.tensor([[[1.0, 0.0, 0.0]]]), ones, offsets, beta=1.0, iterations=1)
    np.testing.assert_allclose(step[0, 0].numpy(), [1 / 2, 1 / 3, 0.0], rtol=1e-6)
    # A 1-D chain of 6 with a weak link in the middle, 16 steps: x T^16 of the dense matrix.
    affinities = torch.tensor([[[0.9, 0.8, 0.1, 0.95, 0.7, 0.0]]])
    maps = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]])
    walked = random_walk(maps, affinities, offsets, beta=2.0, iterations=16)
    t = dense_transition(affinities.numpy(), offsets, (1, 6), 2.0)
    expected = maps.reshape(2, -1).numpy() @ np.linalg.matrix_power(t, 16)
    np.testing.assert_allclose(walked.reshape(2, -1).numpy(), expected, rtol=1e-5, atol=1e-7)


def test_random_walk_in_two_regions_equals_the_dense_matrix_power_and_stays_in_its_region():
    offsets = neighbour_offsets(3)
    region = torch.zeros(6, 6)
    region[:, 3:] = 1
    features = torch.stack([region * 4, region * 4])  # distance 4 across the boundary, 0 within
    affinities = pair_affinities(features, offsets)
    maps = torch.zeros(1, 6, 6)
    maps[0, 2, 0] = 1.0  # a seed in the left region
    walked = random_walk(maps, affinities, offsets, beta=8.0, iterations=32)
    t = dense_transition(affinities.numpy(), offsets, (6, 6), 8.0)
    expected = maps.reshape(1, -1).numpy() @ np.linalg.matrix_power(t, 32)
    np.testing.assert_allclose(walked.reshape(1, -1).numpy(), expected, rtol=1e-5, atol=1e-9)
    left, right = walked[0, :, :3], walked[0, :, 3:]
    assert right.max() < 1e-6 * left.min()  # e^-32 per crossing: the walk stays on its side


def test_grid_helpers_and_memory_estimate():
    maps = torch.arange(16.0).reshape(1, 4, 4)
    np.testing.assert_allclose(to_grid(maps, (2, 2))[0].numpy(), [[2.5, 4.5], [10.5, 12.5]])
    assert to_image(torch.ones(2, 3, 3), (7, 9)).shape == (2, 7, 9) and to_grid(torch.zeros(0, 5, 5), (2, 2)).shape == (0, 2, 2)
    assert random_walk_bytes((10, 10), 34, 2, 448) == 4 * 100 * (448 + 3 * 34 + 1 + 6 + 2)


def two_texture_batch(rng: np.random.Generator, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose left part (random width) is fine vertical stripes and right part coarse dots;
    seeds: stripes 1, dots 0."""
    images, seeds = [], []
    ys, xs = np.mgrid[:size, :size]
    for _ in range(4):
        cut = int(rng.integers(size // 4, 3 * size // 4))
        stripes = ((xs // 2) % 2).astype(np.float32)
        dots = (((ys // 6) % 2) * ((xs // 6) % 2)).astype(np.float32)
        image = np.where(xs < cut, stripes, dots) + 0.05 * rng.standard_normal((size, size))
        images.append(np.repeat(image[None], 3, axis=0))
        seeds.append(np.where(xs < cut, 1, 0))
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(np.stack(seeds))


@pytest.mark.parametrize("kind", ["embedding", "boundary"])
def test_affinity_net_learns_to_separate_two_textures(kind):
    from wsss.affinity import affinities_of
    from wsss.models.vgg import vgg16_features
    from wsss.systems.affinity import AffinitySystem

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    system = AffinitySystem(vgg16_features(width=0.125), stride=8, radius=3, embedding=32, lr=0.05, kind=kind)
    optimizer = torch.optim.SGD([p for p in system.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    def gap(images, seeds) -> float:
        with torch.no_grad():
            a = affinities_of(system.model(images), system.offsets, kind)
        bg, fg, neg = affinity_labels(system.seeds_on_grid(seeds), system.offsets)
        return float(a[fg | bg].mean() - a[neg].mean())

    test_images, test_seeds = two_texture_batch(np.random.default_rng(99))
    before = gap(test_images, test_seeds)
    for _ in range(40):
        images, seeds = two_texture_batch(rng)
        pairs = affinity_labels(system.seeds_on_grid(seeds), system.offsets)
        loss = affinity_loss(affinities_of(system.model(images), system.offsets, kind), pairs)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = gap(test_images, test_seeds)
    assert after > before + 0.3, (before, after)  # untrained: about 0 (measured -0.03 and 0.04); after 40 steps about 0.4
    assert all(not p.requires_grad for p in system.model.trunk.parameters())  # the trunk stayed frozen


def test_paths_and_boundary_affinities_by_hand():
    from wsss.affinity import boundary_affinities, path_points

    assert path_points((0, 3)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert path_points((2, 1)) == [(0, 0), (1, 0), (2, 1)]  # one cell per step of the longer axis, rounded half to even
    assert path_points((1, -4)) == [(0, 0), (0, -1), (0, -2), (1, -3), (1, -4)]
    # A row with a boundary of 0.9 at x = 2: pairs that cross or touch it get 1 - 0.9.
    edges = torch.tensor([[0.0, 0.1, 0.9, 0.0, 0.2]])
    a = boundary_affinities(edges, [(0, 1), (0, 2)])
    np.testing.assert_allclose(a[0, 0].numpy(), [0.9, 0.1, 0.1, 0.8, 0.0], rtol=1e-6)  # the last pair leaves the grid
    np.testing.assert_allclose(a[1, 0].numpy(), [0.1, 0.1, 0.1, 0.0, 0.0], rtol=1e-6)
    # On a grid: brute force over every cell and offset.
    rng = np.random.default_rng(1)
    edges = rng.random((5, 6)).astype(np.float32)
    offsets = neighbour_offsets(3)
    a = boundary_affinities(torch.from_numpy(edges), offsets).numpy()
    for o, offset in enumerate(offsets):
        for y, x in itertools.product(range(5), range(6)):
            if 0 <= y + offset[0] < 5 and 0 <= x + offset[1] < 6:
                expected = 1 - max(edges[y + py, x + px] for py, px in path_points(offset))
            else:
                expected = 0.0
            assert a[o, y, x] == pytest.approx(expected, abs=1e-6)
