"""Tests for wsss.pseudo: eq. 10 superpixel voting and the CAM seed rule."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from wsss.pseudo import (
    SLIC_DEFAULTS,
    cam_best_class,
    cam_seed_labels,
    seed_labels_from_best,
    slic_segments,
    superpixel_labels,
)


def blank_image(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width, 3), np.uint8)


def loop_superpixel_labels(cams, classes, segments, threshold):
    """Straightforward eq. 10: one superpixel at a time, classes in order, strict '>' for ties."""
    out = np.zeros(segments.shape, np.uint8)
    for seg_id in np.unique(segments):
        mask = segments == seg_id
        best_class, best_score = 0, -np.inf
        for c, cam in zip(classes, cams):
            score = cam[mask].astype(np.float64).mean()
            if score > best_score:
                best_class, best_score = c, score
        out[mask] = best_class if best_score >= threshold else 0
    return out


def test_hand_made_noncontiguous_segments():
    # Ids -3, 5, 7, 100: negative and gapped ids are fine.
    segments = np.array([[7, 7, -3, -3], [100, 100, 5, 5]])
    cams = np.zeros((2, 2, 4))
    cams[0] = [[0.8, 0.6, 0.1, 0.1], [0.0, 0.2, 0.4, 0.2]]
    cams[1] = [[0.5, 0.5, 0.2, 0.3], [0.1, 0.3, 0.5, 0.4]]
    labels = superpixel_labels(blank_image(2, 4), cams, [3, 12], segments=segments)
    # seg 7: S = (0.7, 0.5) -> 3; seg -3: (0.1, 0.25) -> bg; seg 100: (0.1, 0.2) -> bg;
    # seg 5: (0.3, 0.45) -> 12
    np.testing.assert_array_equal(labels, [[3, 3, 0, 0], [0, 0, 12, 12]])
    assert labels.dtype == np.uint8


def test_ignore_band_on_two_superpixels_by_hand():
    """Left superpixel mean 0.35 (in [0.25, 0.45): uncertain), right 0.5 (sure class) -- and with
    the paper's rule (no band, threshold 0.3) both are class 7."""
    segments = np.array([[0, 0, 1, 1]])
    cams = np.array([[[0.3, 0.4, 0.5, 0.5]]])
    np.testing.assert_array_equal(superpixel_labels(blank_image(1, 4), cams, [7], threshold=0.25, segments=segments, ignore_below=0.45),
                                  [[255, 255, 7, 7]])
    np.testing.assert_array_equal(superpixel_labels(blank_image(1, 4), cams, [7], threshold=0.3, segments=segments), [[7, 7, 7, 7]])
    # Below the band: background; exactly at its top: the class; exactly at its bottom: uncertain.
    np.testing.assert_array_equal(superpixel_labels(blank_image(1, 4), cams, [7], threshold=0.4, segments=segments, ignore_below=0.5),
                                  [[0, 0, 7, 7]])
    np.testing.assert_array_equal(superpixel_labels(blank_image(1, 4), cams, [7], threshold=0.35, segments=segments, ignore_below=0.5),
                                  [[255, 255, 7, 7]])
    with pytest.raises(ValueError, match="ignore_below must be a finite number above threshold"):
        superpixel_labels(blank_image(1, 4), cams, [7], threshold=0.3, segments=segments, ignore_below=0.3)


def test_huge_segment_ids_take_the_relabelling_path():
    segments = np.array([[10**12, 10**12], [0, 0]], dtype=np.int64)
    cams = np.array([[[0.9, 0.9], [0.1, 0.1]]], np.float32)
    labels = superpixel_labels(blank_image(2, 2), cams, [4], segments=segments)
    np.testing.assert_array_equal(labels, [[4, 4], [0, 0]])


def test_ties_go_to_the_first_listed_class():
    segments = np.array([[0, 0, 1, 1]])
    cams = np.array([[[0.6, 0.4, 0.5, 0.5]], [[0.5, 0.5, 0.3, 0.7]]])  # means tie in both
    np.testing.assert_array_equal(
        superpixel_labels(blank_image(1, 4), cams, [2, 9], segments=segments), [[2, 2, 2, 2]]
    )
    np.testing.assert_array_equal(
        superpixel_labels(blank_image(1, 4), cams[::-1], [9, 2], segments=segments), [[9, 9, 9, 9]]
    )


def test_score_equal_to_threshold_is_foreground():
    below = np.nextafter(0.3, 0.0)
    segments = np.array([[0, 1, 1, 2, 2]])
    cams = np.array([[[0.3, 0.3, 0.3, below, below]]])  # means: 0.3, 0.3 (exact), just below
    labels = superpixel_labels(blank_image(1, 5), cams, [6], threshold=0.3, segments=segments)
    np.testing.assert_array_equal(labels, [[6, 6, 6, 0, 0]])
    # Larger superpixel with an exactly representable mean.
    cams = np.full((1, 3, 3), 0.25, np.float16)
    segments = np.zeros((3, 3), np.int32)
    image = blank_image(3, 3)
    assert (superpixel_labels(image, cams, [1], threshold=0.25, segments=segments) == 1).all()
    assert (superpixel_labels(image, cams, [1], threshold=0.2501, segments=segments) == 0).all()


def test_no_classes_gives_background():
    labels = superpixel_labels(blank_image(3, 4), np.zeros((0, 3, 4), np.float32), [],
                               segments=np.zeros((3, 4), int))
    assert labels.shape == (3, 4) and labels.dtype == np.uint8 and not labels.any()
    # Also without precomputed segments.
    image = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    assert not superpixel_labels(image, np.zeros((0, 20, 24)), []).any()


def test_all_zero_class_map():
    segments = np.array([[0, 0, 1, 1]])
    cams = np.array([[[0.0, 0.0, 0.0, 0.0]], [[0.9, 0.7, 0.1, 0.0]]])
    labels = superpixel_labels(blank_image(1, 4), cams, [5, 8], segments=segments)
    np.testing.assert_array_equal(labels, [[8, 8, 0, 0]])
    # With threshold 0, a mean of exactly 0 is not < 0: foreground, first class on the tie.
    labels = superpixel_labels(blank_image(1, 4), cams[:1], [5], threshold=0.0, segments=segments)
    np.testing.assert_array_equal(labels, [[5, 5, 5, 5]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_matches_per_superpixel_loop_on_random_inputs(dtype):
    rng = np.random.default_rng(42)
    height, width = 30, 40
    for k in (1, 2, 4):
        cams = rng.random((k, height, width)).astype(dtype)
        # Few values so that ties and near-threshold means actually occur.
        cams[:, : height // 2] = rng.choice([0.0, 0.25, 0.5], size=(k, height // 2, width))
        classes = rng.choice(np.arange(1, 21), size=k, replace=False)
        segments = rng.choice([-5, 0, 3, 17, 18, 250], size=(height, width))
        for threshold in (0.25, 0.3, 0.5):
            got = superpixel_labels(blank_image(height, width), cams, classes, threshold, segments)
            np.testing.assert_array_equal(got, loop_superpixel_labels(cams, classes, segments, threshold))


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.standard_normal((height, width, 3)), sigma=(4, 4, 0))
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 255).astype(np.uint8)


def test_with_slic_on_small_image():
    image = smooth_image(48, 64)
    rng = np.random.default_rng(1)
    cams = gaussian_filter(rng.random((2, 48, 64)), sigma=(0, 6, 6))
    cams = (cams - cams.min()) / (cams.max() - cams.min())
    classes = [7, 15]
    labels = superpixel_labels(image, cams, classes, n_segments=30)
    assert labels.shape == (48, 64) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 7, 15}
    assert len(np.unique(labels)) >= 2  # normalised maps reach 1 somewhere: not all background
    segments = slic_segments(image, n_segments=30)
    assert segments.shape == (48, 64) and segments.min() == SLIC_DEFAULTS["start_label"]
    np.testing.assert_array_equal(labels, superpixel_labels(image, cams, classes, segments=segments))
    # Labels are constant inside each superpixel.
    for seg_id in np.unique(segments):
        assert len(np.unique(labels[segments == seg_id])) == 1


def test_cam_seed_labels_hand_made():
    cams = np.array([
        [[0.9, 0.2, 0.5, 0.4]],
        [[0.3, 0.1, 0.5, 0.6]],
    ], np.float32)
    np.testing.assert_array_equal(cam_seed_labels(cams, [4, 11], 0.3), [[4, 0, 4, 11]])
    # A score equal to the threshold is background (background is first in the argmax).
    np.testing.assert_array_equal(cam_seed_labels(cams, [4, 11], 0.5), [[4, 0, 0, 11]])
    np.testing.assert_array_equal(cam_seed_labels(cams, [4, 11], 1.0), [[0, 0, 0, 0]])
    np.testing.assert_array_equal(cam_seed_labels(cams, [4, 11], 0.0), [[4, 4, 4, 11]])
    assert not cam_seed_labels(np.zeros((0, 1, 4), np.float32), [], 0.0).any()
    # float16 maps: the threshold must not be rounded to float16 before comparing.
    value = np.float16(0.3)  # 0.30004883
    threshold = (float(value) + 0.3) / 2  # strictly below value, rounds to value in float16
    assert np.float16(threshold) == value and float(value) > threshold
    np.testing.assert_array_equal(cam_seed_labels(np.full((1, 1, 2), value), [1], threshold), [[1, 1]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cam_seed_labels_matches_padded_argmax_and_sweep(dtype):
    rng = np.random.default_rng(5)
    cams = rng.random((3, 20, 25)).astype(dtype)
    classes = np.array([2, 9, 20])
    best_score, best_label = cam_best_class(cams, classes)
    previous_fg = None
    for threshold in np.linspace(0.0, 1.0, 11):
        # The field's rule, written the field's way: pad a background map, take argmax.
        padded = np.concatenate([np.full((1, 20, 25), threshold), cams.astype(np.float64)])
        expected = np.concatenate([[0], classes])[padded.argmax(axis=0)]
        np.testing.assert_array_equal(cam_seed_labels(cams, classes, threshold), expected)
        swept = seed_labels_from_best(best_score, best_label, threshold)
        np.testing.assert_array_equal(swept, expected)
        fg = swept > 0
        if previous_fg is not None:
            assert not (fg & ~previous_fg).any()  # raising the threshold only removes foreground
        previous_fg = fg
    assert previous_fg is not None and not previous_fg.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cams": np.zeros((1, 4, 5))}, "spatial shape"),
        ({"cams": np.zeros((4, 6))}, "K, H, W"),
        ({"classes": [3, 4]}, "2 classes for 1 CAMs"),
        ({"cams": np.full((1, 4, 6), np.nan)}, "NaN or Inf"),
        ({"cams": np.full((1, 4, 6), np.inf)}, "NaN or Inf"),
        ({"cams": np.full((1, 4, 6), 1.5)}, r"\[0, 1\]"),
        ({"cams": np.ones((1, 4, 6), np.uint8)}, "floating"),
        ({"classes": [0]}, "1..254"),
        ({"classes": [255]}, "1..254"),
        ({"classes": [2.0]}, "integers"),
        ({"cams": np.zeros((2, 4, 6)), "classes": [3, 3]}, "distinct"),
        ({"image": np.zeros((4, 6, 3), np.float32)}, "uint8"),
        ({"image": np.zeros((4, 6), np.uint8)}, r"\(H, W, 3\)"),
        ({"segments": np.zeros((4, 5), int)}, "segments have shape"),
        ({"segments": np.zeros((4, 6))}, "integer ids"),
        ({"threshold": float("nan")}, "finite"),
        ({"n_segments": 5}, "precomputed segments"),
    ],
)
def test_superpixel_labels_bad_inputs_raise(kwargs, message):
    args = {
        "image": blank_image(4, 6),
        "cams": np.zeros((1, 4, 6), np.float32),
        "classes": [3],
        "segments": np.zeros((4, 6), int),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        superpixel_labels(**args)


def test_cam_seed_bad_inputs_raise():
    cams = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="2 classes"):
        cam_seed_labels(cams[:1], [1, 2], 0.3)
    with pytest.raises(ValueError, match="1..254"):
        cam_seed_labels(cams, [1, 255], 0.3)
    with pytest.raises(ValueError, match="NaN"):
        cam_seed_labels(np.full((1, 3, 3), np.nan), [1], 0.3)
    with pytest.raises(ValueError, match="finite"):
        cam_seed_labels(cams, [1, 2], float("inf"))
    with pytest.raises(ValueError, match="shape"):
        seed_labels_from_best(np.zeros((3, 3)), np.zeros((3, 4), np.uint8), 0.3)


def test_crf_scores_snap_a_blurry_cam_to_the_colour_edge():
    """Left half dark, right half bright; the class map is a blur that spills 6 px over the edge
    at scores above the threshold. Without CRF the spill is foreground; with it, the label follows
    the edge (pixel argmax and superpixel vote alike)."""
    pytest.importorskip("pydensecrf.densecrf")
    from wsss.pseudo import crf_scores

    height, width, edge = 24, 48, 24
    image = np.zeros((height, width, 3), np.uint8)
    image[:, edge:] = 230
    cam = np.zeros((height, width), np.float32)
    cam[:, : edge + 6] = 0.9
    cam = np.clip(gaussian_filter(cam, sigma=(0, 3)), 0, 1)[None]
    assert (cam[0, :, edge:edge + 4] > 0.3).all()  # the spill a plain threshold keeps
    plain = superpixel_labels(image, cam, [5], threshold=0.3, segments=np.arange(width)[None].repeat(height, 0))
    assert (plain[:, edge:edge + 4] == 5).all()
    scores = crf_scores(image, cam, threshold=0.3)
    assert scores.shape == (2, height, width) and np.allclose(scores.sum(0), 1, atol=1e-4)
    pixel = np.where(scores.argmax(0) == 1, 5, 0)
    assert (pixel[:, 2:edge - 2] == 5).all() and (pixel[:, edge:] == 0).all()
    voted = superpixel_labels(image, scores[1:], [5], segments=np.arange(width)[None].repeat(height, 0), background=scores[0])
    np.testing.assert_array_equal(voted, pixel)


def test_background_map_competes_with_the_classes_by_hand():
    segments = np.array([[0, 0, 1, 1]])
    cams = np.array([[[0.3, 0.4, 0.6, 0.6]]])
    background = np.array([[0.5, 0.5, 0.2, 0.4]])  # means 0.5 and 0.3 vs class means 0.35 and 0.6
    np.testing.assert_array_equal(superpixel_labels(blank_image(1, 4), cams, [9], segments=segments, background=background), [[0, 0, 9, 9]])
    with pytest.raises(ValueError, match="cannot be combined"):
        superpixel_labels(blank_image(1, 4), cams, [9], segments=segments, background=background, ignore_below=0.5)
