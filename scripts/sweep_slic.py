"""Sweep SLIC ``n_segments`` x ``compactness`` for eq. 10 pseudo-labels on the toy ``train`` split.

For each setting, pseudo-labels are made from the CAM files and scored against the GT masks
(one confusion matrix over the split, :mod:`wsss.metrics`). CAMs come from ``--cams DIR``
(``<id>.npz`` / IRN ``<id>.npy``), or, without it, are synthesised from the GT masks to mimic
low-resolution CAMs: per class, the one-hot mask is Gaussian-blurred (``--blur`` px),
downsampled x``--factor`` by block averaging, bilinearly upsampled back to the image size and
divided by its maximum. The table is printed as Markdown (paste it into docs/slic_sweep.md).

    python scripts/sweep_slic.py [--data-root toy] [--split train] [--cams DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.transform import resize

from wsss.classes import IGNORE_INDEX, NUM_LABELS
from wsss.data import open_layout
from wsss.formats.cams import find_cam_files, read_cams
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png
from wsss.metrics import confusion_matrix, scores_from_confusion
from wsss.pseudo import DEFAULT_THRESHOLD, SLIC_DEFAULTS, cam_seed_labels, slic_segments, superpixel_labels


def blurry_cams(mask: np.ndarray, blur: float, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) float32 low-resolution-looking CAMs of the classes in ``mask``, and their labels."""
    height, width = mask.shape
    classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}), dtype=np.int64)
    maps = []
    for c in classes:
        onehot = gaussian_filter((mask == c).astype(np.float32), blur)
        h, w = -(-height // factor), -(-width // factor)
        padded = np.pad(onehot, ((0, h * factor - height), (0, w * factor - width)), mode="edge")
        small = padded.reshape(h, factor, w, factor).mean(axis=(1, 3))  # the classifier's stride
        up = resize(small, (h * factor, w * factor), order=1, mode="edge", anti_aliasing=False)[:height, :width]
        maps.append(np.clip(up / max(float(up.max()), 1e-6), 0.0, 1.0))
    cams = np.stack(maps).astype(np.float32) if maps else np.zeros((0, height, width), np.float32)
    return cams, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="toy", help="VOC-layout root or 'toy' (default)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--cams", default=None, help="CAM folder; default: synthetic blurry CAMs from GT")
    parser.add_argument("--blur", type=float, default=4.0, help="synthetic CAMs: Gaussian sigma in px")
    parser.add_argument("--factor", type=int, default=8, help="synthetic CAMs: downsampling factor")
    parser.add_argument("--n-segments", default="50,100,200,400,800,1600")
    parser.add_argument("--compactness", default="1,5,10,20,40")
    parser.add_argument("--sigma", type=float, default=SLIC_DEFAULTS["sigma"])
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    args = parser.parse_args()

    layout = open_layout(args.data_root)
    ids = layout.read_ids(args.split)
    cam_files, missing = find_cam_files(Path(args.cams), ids) if args.cams else ({}, [])
    if missing:
        raise SystemExit(f"no CAM file for {missing[0]} in {args.cams}")
    data = []
    for image_id in ids:
        image, gt = read_image(layout.image_path(image_id)), read_label_png(layout.mask_path(image_id))
        if args.cams:
            cams, classes = read_cams(cam_files[image_id])
        else:
            cams, classes = blurry_cams(gt, args.blur, args.factor)
        data.append((image, gt, cams, classes))
    source = args.cams or f"synthetic (GT blur sigma={args.blur}, x{args.factor} down + bilinear up)"
    sizes = [g.size for _, g, _, _ in data]
    print(f"{len(ids)} images of {layout.root} [{args.split}], mean {np.mean(sizes):.0f} px; CAMs: {source}; "
          f"threshold {args.threshold}, sigma {args.sigma}\n")

    def score(labels_of) -> float:
        total = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
        for item in data:
            total += confusion_matrix(labels_of(*item), item[1])
        return scores_from_confusion(total).miou

    pixel = score(lambda image, gt, cams, classes: cam_seed_labels(cams, classes, args.threshold))
    n_values = [int(v) for v in args.n_segments.split(",")]
    c_values = [float(v) for v in args.compactness.split(",")]
    table = np.zeros((len(n_values), len(c_values)))
    spx = np.zeros(len(n_values))
    start = time.perf_counter()
    for i, n in enumerate(n_values):
        for j, c in enumerate(c_values):
            params = {"n_segments": n, "compactness": c, "sigma": args.sigma}
            table[i, j] = score(lambda image, gt, cams, classes: superpixel_labels(image, cams, classes, args.threshold, **params))
        spx[i] = np.mean([len(np.unique(slic_segments(d[0], n_segments=n, compactness=10.0, sigma=args.sigma))) for d in data])
    best = np.unravel_index(table.argmax(), table.shape)

    print("| n_segments (mean superpixels, px each) | " + " | ".join(f"c={c:g}" for c in c_values) + " |")
    print("|---|" + "---|" * len(c_values))
    for i, n in enumerate(n_values):
        cells = [f"**{100 * v:.2f}**" if (i, j) == best else f"{100 * v:.2f}" for j, v in enumerate(table[i])]
        print(f"| {n} ({spx[i]:.0f}, ~{np.mean(sizes) / spx[i]:.0f} px) | " + " | ".join(cells) + " |")
    print(f"\nper-pixel threshold {args.threshold} (no superpixels): {100 * pixel:.2f} mIoU")
    print(f"best: n_segments={n_values[best[0]]}, compactness={c_values[best[1]]:g}: {100 * table[best]:.2f} mIoU "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
