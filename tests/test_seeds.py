"""IRN's and PSA's confident-seed rules (wsss.seeds) on hand cases, with the CRF stubbed and real."""
from __future__ import annotations

import numpy as np
import pytest

from wsss import seeds
from wsss.seeds import combine_irn, combine_psa, crf_seeds


def test_irn_and_psa_combine_two_label_maps_by_hand():
    strict = np.array([[3, 3, 0, 0, 7]])
    lenient = np.array([[3, 0, 3, 0, 7]])
    # IRN: strict's classes; 0 only where both say background; 255 where only the lenient one has a class.
    assert combine_irn(strict, lenient).tolist() == [[3, 3, 255, 0, 7]]
    # PSA: 255 where strict is background, then 0 wherever lenient is background, over strict's class too.
    assert combine_psa(strict, lenient).tolist() == [[3, 0, 255, 0, 7]]


def test_irn_seeds_take_the_strict_threshold_for_foreground_and_the_lenient_one_for_background(monkeypatch):
    import wsss.crf

    calls = []

    def no_crf(image, labels, num_labels, params=wsss.crf.IRN_LABEL_CRF_PARAMS):
        calls.append((labels.copy(), num_labels, params))
        return labels

    monkeypatch.setattr(wsss.crf, "dense_crf_labels", no_crf)
    image = np.zeros((1, 4, 3), np.uint8)
    cams = np.array([[[0.9, 0.2, 0.02, 0.0]], [[0.0, 0.1, 0.0, 0.4]]], np.float32)  # classes 5 and 9
    result = crf_seeds(image, cams, np.array([5, 9]), "irn", bg_threshold=0.05, fg_threshold=0.30)
    # Pixel 0: 0.9 > 0.30 -> 5. Pixel 1: 0.2 in (0.05, 0.30] -> unknown. Pixel 2: 0.02 <= 0.05 -> background. Pixel 3: 9.
    assert result.tolist() == [[5, 255, 0, 9]]
    assert [c[0].tolist() for c in calls] == [[[1, 0, 0, 2]], [[1, 1, 0, 2]]]  # argmax([0.30, CAMs]) first, then argmax([0.05, CAMs])
    assert all(c[1] == 3 and c[2]["gt_prob"] == 0.7 and c[2]["bi_xy"] == 50 and c[2]["bi_rgb"] == 5 for c in calls)


def test_psa_seeds_use_background_powers_4_and_32(monkeypatch):
    import wsss.crf

    scores = []
    monkeypatch.setattr(wsss.crf, "dense_crf", lambda image, probs, params: scores.append((probs.copy(), params)) or probs)
    cams = np.array([[[0.95, 0.5, 0.1]]], np.float32)
    result = crf_seeds(np.zeros((1, 3, 3), np.uint8), cams, np.array([2]), "psa")
    np.testing.assert_allclose(scores[0][0][0], (1 - cams[0]) ** 4, rtol=1e-6)
    np.testing.assert_allclose(scores[1][0][0], (1 - cams[0]) ** 32, rtol=1e-6)
    assert scores[0][1]["bi_xy"] == 80 and scores[0][1]["bi_rgb"] == 13  # PSA's crf_inference
    # 0.95: class under both powers. 0.5: 0.0625 < 0.5 at power 4 -> class... and class at 32 -> 2.
    # 0.1: 0.656 > 0.1 at power 4 -> background (255 there), 0.034 < 0.1 at 32 -> class: stays 255.
    assert result.tolist() == [[2, 2, 255]]
    assert crf_seeds(np.zeros((2, 2, 3), np.uint8), np.zeros((0, 2, 2), np.float32), np.array([], np.int64), "psa").tolist() == [[0, 0]] * 2
    with pytest.raises(ValueError, match="unknown"):
        crf_seeds(np.zeros((1, 3, 3), np.uint8), cams, np.array([2]), "crf")


@pytest.mark.skipif(not __import__("wsss.crf", fromlist=["crf_available"]).crf_available(), reason="pydensecrf not installed")
def test_irn_seeds_with_the_real_crf_follow_the_image():
    # Left half red, right half blue; the CAM is confident on most of the red half and spills a little
    # over the edge: the label CRF pulls the seeds back to the colour edge.
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, :16] = (220, 30, 30)
    image[:, 16:] = (30, 30, 220)
    cams = np.zeros((1, 24, 32), np.float32)
    cams[0, :, 2:18] = 0.8  # two columns past the edge at x = 16
    result = crf_seeds(image, cams, np.array([4]), "irn")
    assert (result[:, 3:15] == 4).all() and (result[:, 17:] == 0).all()
    assert seeds.SEED_RULES == ("irn", "psa")
