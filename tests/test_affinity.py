"""Affinity math (wsss.affinity) against hand-computed cases and dense matrices; AffinityNet learning
to tell two textures apart."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from wsss.affinity import (affinity_labels, affinity_loss, boundary_affinities, boundary_walk, neighbour_offsets, normalise_walked,
                           pair_affinities, path_points, random_walk, random_walk_bytes, to_grid, to_image)


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
    for radius in (2, 3, 5, 10):  # 10: IRN's training radius
        seeds = rng.choice([0, 1, 7, 255], size=(12, 13))
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
    assert to_image(torch.ones(2, 3, 3), (7, 9), 4).shape == (2, 7, 9) and to_grid(torch.zeros(0, 5, 5), (2, 2)).shape == (0, 2, 2)
    # IRN's and PSA's upsampling: by the stride, then cropped, so cell (i, j) covers pixels [4i, 4i + 4).
    grid = torch.tensor([[[0.0, 1.0, 5.0], [2.0, 3.0, 7.0]]])
    up = to_image(grid, (7, 9), 4)
    np.testing.assert_allclose(up.numpy(), torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="bilinear")[0, :, :7, :9].numpy())
    with pytest.raises(ValueError, match="does not cover"):
        to_image(grid, (9, 9), 4)
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
    system = AffinitySystem(vgg16_features(width=0.125), stride=4 if kind == "boundary" else 8, radius=3, embedding=32, lr=0.05, kind=kind)
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


def test_irn_paths_by_hand():
    # IRN's rule: the cells of the box between the ends whose centre is less than one cell from the segment.
    assert sorted(path_points((0, 4))) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    assert sorted(path_points((1, 1))) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # a diagonal step holds both cells beside it
    assert sorted(path_points((1, -4))) == [(0, -4), (0, -3), (0, -2), (0, -1), (0, 0), (1, -4), (1, -3), (1, -2), (1, -1), (1, 0)]
    # (3, 4): |3x - 4y| < 5 in the box [0, 3] x [0, 4], row by row: x in {0, 1}, {0, 1, 2}, {2, 3, 4}, {3, 4}.
    assert sorted(path_points((3, 4))) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 2), (2, 3), (2, 4), (3, 3), (3, 4)]
    # The count: 26 of the 34 radius-5 paths differ from one cell per step of the longer axis, each a superset of it.
    offsets = neighbour_offsets(5)
    one_per_step = {o: {(round(k * o[0] / max(map(abs, o))), round(k * o[1] / max(map(abs, o)))) for k in range(max(map(abs, o)) + 1)}
                    for o in offsets}
    assert all(one_per_step[o] <= set(path_points(o)) for o in offsets)
    assert sum(one_per_step[o] != set(path_points(o)) for o in offsets) == 26


def test_a_one_cell_diagonal_boundary_cuts_every_pair_across_it():
    size = 14
    ys, xs = np.mgrid[:size, :size]
    boundary = torch.from_numpy((ys == xs).astype(np.float32))  # a diagonal line of 1s, its cells touching only at corners
    offsets = neighbour_offsets(5)
    a = boundary_affinities(boundary, offsets).numpy()
    side = np.sign(ys - xs)  # -1 above the line, 0 on it, 1 below
    across = same = 0
    for o, (dy, dx) in enumerate(offsets):
        for y, x in itertools.product(range(size), range(size)):
            if 0 <= y + dy < size and 0 <= x + dx < size and side[y, x] * side[y + dy, x + dx] == -1:
                across += 1
                assert a[o, y, x] == 0, ((y, x), (dy, dx))
            elif 0 <= y + dy < size and 0 <= x + dx < size and side[y, x] == side[y + dy, x + dx] != 0:
                same += a[o, y, x] == 1
    assert across > 600 and same > 600  # many pairs cross it, and pairs on one side stay connected


def irn_dense_propagation(maps: np.ndarray, boundary: np.ndarray, radius: int, beta: float, squarings: int) -> np.ndarray:
    """IRN's propagate_to_edge written densely from its definition: affinities 1 - max boundary over
    the path cells (cells of the box within one cell of the segment), A = a^beta symmetric with a
    unit diagonal, T = A / column sums squared ``squarings`` times, maps * (1 - boundary) times it."""
    h, w = boundary.shape
    n = h * w
    a = np.eye(n)
    for dy in range(radius):
        for dx in range(-radius + 1, radius):
            if not (dy * dy + dx * dx < radius * radius and (dy > 0 or dx > 0)):
                continue
            cells = [(py, px) for py in range(min(0, dy), max(0, dy) + 1) for px in range(min(0, dx), max(0, dx) + 1)
                     if (dy * px - dx * py) ** 2 / (dy * dy + dx * dx) < 1]
            for y, x in itertools.product(range(h), range(w)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + x + dx
                    a[i, j] = a[j, i] = (1 - max(boundary[y + py, x + px] for py, px in cells)) ** beta
    t = a / a.sum(axis=0, keepdims=True)
    for _ in range(squarings):
        t = t @ t
    return ((maps * (1 - boundary)).reshape(len(maps), -1) @ t).reshape(maps.shape)


@pytest.mark.parametrize("radius, beta, squarings", [(3, 10.0, 4), (5, 10.0, 8)])
def test_boundary_walk_equals_irns_propagation_as_a_dense_matrix_power(radius, beta, squarings):
    rng = np.random.default_rng(radius)
    boundary = rng.random((6, 7)) ** 3  # mostly low, a few strong cells
    maps = rng.random((2, 6, 7))
    walked = boundary_walk(torch.from_numpy(maps), torch.from_numpy(boundary), radius=radius, beta=beta, steps=2 ** squarings)
    np.testing.assert_allclose(walked.numpy(), irn_dense_propagation(maps, boundary, radius, beta, squarings), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="boundary map"):
        boundary_walk(torch.zeros(1, 3, 3), torch.zeros(3, 4))


def test_boundary_walk_zeroes_the_maps_on_the_boundary_and_keeps_two_regions_apart():
    boundary = torch.zeros(6, 7)
    boundary[:, 3] = 1.0  # a wall down the middle
    on_wall = torch.zeros(1, 6, 7)
    on_wall[0, :, 3] = 5.0  # a map that lives only on the wall: (1 - boundary) removes all of it
    assert boundary_walk(on_wall, boundary, radius=3, beta=10.0, steps=8).abs().max() == 0
    kept = boundary_walk(on_wall, boundary, radius=3, beta=10.0, steps=8, edge_product=False)  # the option off: walked as it is
    assert kept[0, :, 3].min() > 0 and kept[0, :, :3].max() == 0  # a wall cell has affinity 0 to every neighbour: it stays
    left = torch.zeros(1, 6, 7)
    left[0, 2, 0] = 1.0
    walked = boundary_walk(left, boundary, radius=3, beta=10.0, steps=64)[0]
    assert walked[:, 4:].max() == 0 and walked[:, :3].min() > 0  # affinity 0 across the wall: nothing leaks


def test_global_and_per_class_normalisation_on_a_two_class_case():
    walked = torch.tensor([[[2.0, 1.0]], [[0.5, 0.25]]])
    np.testing.assert_allclose(normalise_walked(walked, "global").numpy(), [[[1.0, 0.5]], [[0.25, 0.125]]])
    np.testing.assert_allclose(normalise_walked(walked, "per_class").numpy(), [[[1.0, 0.5]], [[1.0, 0.5]]])
    from wsss.pseudo import cam_seed_labels  # IRN's label rule at 0.25: the drained class loses its pixels only globally

    assert cam_seed_labels(normalise_walked(walked, "global").numpy(), [3, 7], 0.25).tolist() == [[3, 3]]
    assert cam_seed_labels(np.array([[[0.1, 0.5]], [[0.2, 0.125]]]), [3, 7], 0.25).tolist() == [[0, 3]]
    assert normalise_walked(torch.zeros(2, 1, 2), "global").eq(0).all()
    with pytest.raises(ValueError):
        normalise_walked(walked, "max")


def test_paths_and_boundary_affinities_by_hand():
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


def test_unknown_names_are_refused_not_replaced_by_a_default():
    from wsss.models.vgg import vgg16_features
    from wsss.systems.affinity import affinity_model
    from wsss.systems.classifier import ClassifierSystem
    from wsss.systems.schedules import schedule_factor

    with pytest.raises(ValueError, match="'boundry' unknown"):
        affinity_model(vgg16_features(width=0.125), "boundry", 4, 8, True)
    from wsss.affinity import affinities_of

    with pytest.raises(ValueError, match="unknown"):
        affinities_of(torch.zeros(1, 2, 3, 3), neighbour_offsets(2), "boundry")
    with pytest.raises(ValueError, match="'cosine' unknown"):
        schedule_factor("cosine", 10)
    assert schedule_factor("constant", 10)(5) == 1.0
    with pytest.raises(ValueError, match="width must be > 0"):
        vgg16_features(width=0)
    system = ClassifierSystem(weights="none", width=0.125, optimizer="adamw")
    system.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    with pytest.raises(ValueError, match="'adamw' unknown"):
        system.configure_optimizers()


def test_the_references_training_settings_by_kind():
    from wsss.models.vgg import vgg16_features
    from wsss.stages.refine import RefineOptions
    from wsss.systems.affinity import AffinitySystem

    irn, psa = RefineOptions(), RefineOptions(kind="embedding")
    assert (irn.kind, irn.stride, irn.train_radius, irn.radius, irn.beta, irn.iterations) == ("boundary", 4, 10, 5, 10.0, 256)
    assert (irn.momentum, irn.weight_decay, irn.scale_range, irn.seeds, irn.normalisation) == (1e-4, 1e-4, (0.5, 1.5), "crf", "global")
    assert (psa.stride, psa.train_radius, psa.beta, psa.momentum, psa.weight_decay) == (8, 5, 8.0, 5e-4, 5e-4)
    assert RefineOptions(beta=6.0).beta == 6.0  # a value given wins over the kind's
    system = AffinitySystem(vgg16_features(width=0.125), **{k: getattr(irn, k) for k in ("stride", "embedding", "frozen_trunk", "lr",
                                                                                        "weight_decay", "momentum", "kind")},
                            radius=irn.train_radius)
    assert len(system.offsets) == 152  # IRN's training radius 10: half the 304 cells of the disk
    system.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimizer = system.configure_optimizers()["optimizer"]
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [(0.1, 1e-4, 1e-4)]  # not momentum 0.9
    with pytest.raises(Exception, match="must be 4 for the boundary kind"):
        RefineOptions(stride=8)
