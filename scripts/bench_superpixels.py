"""Micro-benchmark: SLIC vs the rest of ``superpixel_labels`` on VOC-sized random inputs.

Target: the eq. 10 voting (validation + per-superpixel means + lookup) costs <= 10% of SLIC.

    PYTHONPATH=. python scripts/bench_superpixels.py [--images 20] [--height 375] [--width 500]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import gaussian_filter

from wsss.pseudo import SLIC_DEFAULTS, slic_segments, superpixel_labels


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise rescaled to [0, 1] (a stand-in for natural images / CAMs)."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    field -= field.min()
    return field / max(field.max(), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    shape = (args.height, args.width)
    slic_time = vote_time = 0.0
    num_segments = []
    for _ in range(args.images):
        image = np.stack([smooth_field(rng, shape, 8.0) for _ in range(3)], axis=-1)
        image = (image * 255).astype(np.uint8)
        k = int(rng.integers(1, 4))
        cams = np.stack([smooth_field(rng, shape, 30.0) for _ in range(k)]).astype(np.float32)
        classes = rng.choice(np.arange(1, 21), size=k, replace=False)

        start = time.perf_counter()
        segments = slic_segments(image)
        middle = time.perf_counter()
        labels = superpixel_labels(image, cams, classes, segments=segments)
        end = time.perf_counter()
        slic_time += middle - start
        vote_time += end - middle
        num_segments.append(len(np.unique(segments)))
        assert labels.dtype == np.uint8 and labels.shape == shape

    n = args.images
    print(f"{n} images {args.height}x{args.width}, K=1..3, SLIC {SLIC_DEFAULTS}")
    print(f"superpixels per image: mean {np.mean(num_segments):.0f} "
          f"(min {min(num_segments)}, max {max(num_segments)})")
    print(f"slic_segments:                {1000 * slic_time / n:8.2f} ms/image")
    print(f"rest of superpixel_labels:    {1000 * vote_time / n:8.2f} ms/image")
    share = vote_time / (slic_time + vote_time)
    print(f"share outside SLIC:           {100 * share:8.2f} %  (target <= 10 %; "
          f"{100 * vote_time / slic_time:.2f} % of SLIC)")


if __name__ == "__main__":
    main()
