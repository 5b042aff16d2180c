"""Throughput of ``wsss pseudo-labels`` and ``wsss evaluate`` on VOC-sized synthetic data.

1. Pseudo-labels: images/s of the full per-image step (read JPEG + CAM npz, SLIC, voting, atomic
   PNG write) with 1 and 2 workers, and the share of the time spent outside SLIC.
2. Evaluation: images/s of :func:`wsss.stages.evaluate.evaluate_labels` on ``--pairs`` mask pairs
   with 1 and 2 workers, against a straightforward torchmetrics loop (PIL decode +
   ``MulticlassJaccardIndex.update`` per image).

Everything is written to a temporary folder that is removed afterwards.

    python scripts/bench_pseudo.py [--images 16] [--pairs 1449] [--height 375] [--width 500]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from wsss.formats.cams import read_cams, write_cams
from wsss.formats.images import read_image
from wsss.formats.label_png import write_label_png
from wsss.pseudo import SLIC_DEFAULTS, slic_segments
from wsss.stages.evaluate import evaluate_labels
from wsss.stages.pseudo_labels import PseudoLabelOptions, make_pseudo_label, make_pseudo_labels


def synthetic_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured RGB image with 1-3 elliptic objects, and its (H, W) uint8 mask (255 on edges)."""
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), np.uint8)
    for label in rng.choice(np.arange(1, 21), size=int(rng.integers(1, 4)), replace=False):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.1, 0.35) * height, rng.uniform(0.1, 0.35) * width
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = label
    noise = gaussian_filter(rng.standard_normal((height, width, 3)), sigma=(4, 4, 0))
    colours = rng.uniform(40, 215, size=(256, 3))
    image = np.clip(colours[mask] + 25 * noise / noise.std(), 0, 255).astype(np.uint8)
    edge = gaussian_filter(mask.astype(float), 1.0) != mask
    mask = np.where(edge & (mask > 0), np.uint8(255), mask)
    return image, mask


def blurry_cams(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64)
    cams = np.stack([gaussian_filter((mask == c).astype(np.float32), 12.0) for c in classes])
    cams /= np.maximum(cams.max(axis=(1, 2), keepdims=True), 1e-6)
    return classes, cams.astype(np.float16)


def bench_pseudo(tmp: Path, images: int, height: int, width: int, rng: np.random.Generator) -> None:
    image_dir, cam_dir = tmp / "JPEGImages", tmp / "cams"
    image_dir.mkdir()
    paths = {}
    for k in range(images):
        image, mask = synthetic_scene(rng, height, width)
        image_id = f"img_{k:05d}"
        Image.fromarray(image).save(image_dir / f"{image_id}.jpg", quality=90)
        classes, cams = blurry_cams(mask)
        write_cams(cam_dir / f"{image_id}.npz", classes=classes, cams=cams)
        paths[image_id] = image_dir / f"{image_id}.jpg"

    # In-process split of the per-image time: SLIC alone vs the whole step.
    slic_time = total_time = 0.0
    for image_id, path in paths.items():
        start = time.perf_counter()
        make_pseudo_label(path, cam_dir / f"{image_id}.npz", tmp / "single" / f"{image_id}.png")
        total_time += time.perf_counter() - start
        image = read_image(path)
        read_cams(cam_dir / f"{image_id}.npz")
        start = time.perf_counter()
        slic_segments(image)
        slic_time += time.perf_counter() - start

    id_list = tmp / "ids.txt"  # tmp is laid out as a VOC root: JPEGImages/ and a list file
    id_list.write_text("\n".join(paths) + "\n")
    print(f"== pseudo-labels: {images} images {height}x{width}, SLIC {SLIC_DEFAULTS}")
    print(f"per image (1 process): {1000 * total_time / images:.1f} ms, of which SLIC {1000 * slic_time / images:.1f} ms; "
          f"share outside SLIC (decode, CAM load/validation, voting, PNG write): {100 * (1 - slic_time / total_time):.1f} %")
    rates = {}
    for workers in (1, 2):
        summary = make_pseudo_labels(tmp, cam_dir, tmp / f"out{workers}", split=str(id_list), options=PseudoLabelOptions(workers=workers),
                                     overwrite=True, progress=False)
        assert summary.written == images and not summary.failed
        rates[workers] = images / summary.seconds
        print(f"workers={workers}: {rates[workers]:.2f} images/s ({summary.seconds:.2f} s incl. Trainer and worker start)")
    print(f"scaling 2 vs 1 workers: x{rates[2] / rates[1]:.2f}")


def bench_evaluate(tmp: Path, pairs: int, height: int, width: int, rng: np.random.Generator) -> None:
    import torch
    from torchmetrics.classification import MulticlassJaccardIndex

    gt_dir, pred_dir = tmp / "gt", tmp / "pred"
    ids = [f"m_{k:05d}" for k in range(pairs)]
    base = [synthetic_scene(rng, height, width)[1] for _ in range(8)]  # reuse a few scenes: writing is not timed
    for k, image_id in enumerate(ids):
        gt = base[k % len(base)]
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        y, x = rng.integers(0, height - 60), rng.integers(0, width - 60)
        pred[y:y + 60, x:x + 60] = rng.integers(0, 21)
        write_label_png(gt_dir / f"{image_id}.png", gt)
        write_label_png(pred_dir / f"{image_id}.png", pred)

    print(f"\n== evaluate: {pairs} mask pairs {height}x{width}")
    timings = {}
    for workers in (1, 2):
        start = time.perf_counter()
        scores = evaluate_labels(pred_dir, gt_dir, ids, workers=workers)
        timings[f"evaluate_labels workers={workers}"] = time.perf_counter() - start

    torch.set_num_threads(1)  # the fair single-process baseline on a shared machine
    metric = MulticlassJaccardIndex(num_classes=21, ignore_index=255, average=None)
    start = time.perf_counter()
    for image_id in ids:
        pred = np.asarray(Image.open(pred_dir / f"{image_id}.png"))
        gt = np.asarray(Image.open(gt_dir / f"{image_id}.png"))
        metric.update(torch.from_numpy(np.where(pred == 255, 0, pred)).long(), torch.from_numpy(gt.copy()).long())
    reference = metric.compute().numpy()
    timings["torchmetrics loop (1 process)"] = time.perf_counter() - start
    present = ~np.isnan(scores.iou)
    assert np.allclose(reference[present], scores.iou[present]), "evaluate_labels disagrees with torchmetrics"

    base_time = timings["torchmetrics loop (1 process)"]
    for name, seconds in timings.items():
        print(f"{name:<32} {pairs / seconds:8.1f} images/s  ({seconds:6.2f} s, x{base_time / seconds:.2f} vs torchmetrics loop)")
    print(f"mIoU {100 * scores.miou:.2f} % (same per-class IoU as torchmetrics on present classes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images for the pseudo-label benchmark")
    parser.add_argument("--pairs", type=int, default=1449, help="mask pairs for the evaluation benchmark (VOC val: 1449)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        bench_pseudo(Path(tmp), args.images, args.height, args.width, rng)
        bench_evaluate(Path(tmp), args.pairs, args.height, args.width, rng)


if __name__ == "__main__":
    main()
