"""Time every stage of the pipeline per image or per step on this machine's accelerator, and project
the paper-scale schedule from those rates.

Paper scale (configs/pipeline.yaml): VOC 2012 train_aug, 10,582 images; classifier 15 epochs at
batch 16, crop 448; CAMs of train_aug (LayerCAM stages 3-5 plus Grad-CAM and Grad-CAM++ stage 5,
one pass) at VOC size 375x500; pseudo-labels (SLIC + eq. 10 on CPU worker processes); DeepLab-
LargeFOV 16,000 steps at batch 10, crop 321; prediction of val's 1,449 images.

Each stage runs the real code on inputs of the real shapes: the ``ClassifierSystem`` and
``SegmenterSystem`` training steps (forward, loss, backward, SGD step), ``compute_cam_sets``,
``superpixel_labels`` with SLIC on a 375x500 image, ``image_probabilities``. Weights are random
(``--weights`` for a real file); timing does not depend on them. Not timed: data loading and
JPEG decoding (DataLoader workers overlap them with the steps on a GPU machine), checkpoint
writes and validation passes (a few minutes in all); the projection says so.

Examples:
  python scripts/bench_pipeline.py                                  # cuda if present, bf16
  python scripts/bench_pipeline.py --device cpu --steps 1 --workers 2
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

PAPER = {"train_images": 10582, "classifier_epochs": 15, "classifier_batch": 16, "classifier_crop": 448,
         "segmenter_steps": 16000, "segmenter_batch": 10, "segmenter_crop": 321, "val_images": 1449}
IMAGE = (375, 500)
CLASSES_PER_IMAGE = (1, 2, 1, 3)  # cycled; VOC train_aug averages ~1.5 classes per image


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (or images) per stage, after one warm-up")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="autocast dtype of training and prediction")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC training and prediction (the training stages' default)")
    parser.add_argument("--cam-batch", type=int, default=4, help="images per CAM forward")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU processes assumed for pseudo-labels")
    parser.add_argument("--weights", default="none")
    return parser.parse_args(argv)


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call after one untimed warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    from wsss.cams import compute_cam_sets
    from wsss.pseudo import superpixel_labels
    from wsss.segmentation import image_probabilities
    from wsss.systems.classifier import ClassifierSystem
    from wsss.systems.segmenter import SegmenterSystem

    torch.manual_seed(0)
    rates: dict[str, float] = {}

    classifier = ClassifierSystem(weights=args.weights, channels_last=args.channels_last).to(device).train()
    images = torch.randn(PAPER["classifier_batch"], 3, PAPER["classifier_crop"], PAPER["classifier_crop"], device=device)
    targets = (torch.rand(PAPER["classifier_batch"], 20, device=device) < 0.1).float()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=1e-3, momentum=0.9)

    def classifier_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.multilabel_soft_margin_loss(classifier(images).float(), targets)
        loss.backward()
        optimizer.step()

    rates["classifier step"] = timed(classifier_step, args.steps, device)
    del optimizer, images

    model = classifier.model.eval()  # NHWC with --channels-last, as `cams --channels-last` runs it
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = torch.randn(args.cam_batch, 3, *IMAGE, device=device).contiguous(memory_format=memory_format)
    classes = [list(range(CLASSES_PER_IMAGE[n % len(CLASSES_PER_IMAGE)])) for n in range(args.cam_batch)]
    requests = {"layercam": ["stage3", "stage4", "stage5"], "gradcam": ["stage5"], "gradcam++": ["stage5"]}
    rates["CAM image"] = timed(lambda: compute_cam_sets(model, batch, classes, requests), args.steps, device) / args.cam_batch
    del classifier, model, batch

    rng = np.random.default_rng(0)
    photo = (rng.random((*IMAGE, 3)) * 255).astype(np.uint8)
    cams = rng.random((2, *IMAGE)).astype(np.float32)
    rates["pseudo-label image (1 CPU process)"] = timed(lambda: superpixel_labels(photo, cams, [3, 7]), args.steps, torch.device("cpu"))

    segmenter = SegmenterSystem(weights=args.weights, channels_last=args.channels_last).to(device).train()
    crops = torch.randn(PAPER["segmenter_batch"], 3, PAPER["segmenter_crop"], PAPER["segmenter_crop"], device=device)
    masks = torch.randint(0, 21, (PAPER["segmenter_batch"], PAPER["segmenter_crop"], PAPER["segmenter_crop"]), device=device)
    optimizer = torch.optim.SGD(segmenter.model.optimizer_param_groups(1e-3, 5e-4), lr=1e-3, momentum=0.9)

    def segmenter_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = segmenter.loss(segmenter(crops), masks)
        loss.backward()
        optimizer.step()

    rates["segmenter step"] = timed(segmenter_step, args.steps, device)
    del optimizer, crops, masks
    segmenter.eval()
    image = torch.randn(3, *IMAGE, device=device)

    def predict():
        with torch.inference_mode(), autocast():
            image_probabilities(segmenter, image).argmax(0)

    rates["prediction image"] = timed(predict, args.steps, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.precision}; channels_last={args.channels_last}; {args.steps} timed steps each")
    for stage, seconds in rates.items():
        print(f"  {stage:36s} {seconds:8.3f} s")
    classifier_steps = PAPER["classifier_epochs"] * PAPER["train_images"] // PAPER["classifier_batch"]
    projection = {
        f"classifier: {classifier_steps:,} steps (15 epochs, batch 16, crop 448)": classifier_steps * rates["classifier step"],
        f"CAMs: {PAPER['train_images']:,} images, 3 methods in one pass": PAPER["train_images"] * rates["CAM image"],
        f"pseudo-labels: {PAPER['train_images']:,} images on {args.workers} CPU processes":
            PAPER["train_images"] * rates["pseudo-label image (1 CPU process)"] / args.workers,
        f"segmenter: {PAPER['segmenter_steps']:,} steps (batch 10, crop 321)": PAPER["segmenter_steps"] * rates["segmenter step"],
        f"prediction: {PAPER['val_images']:,} val images": PAPER["val_images"] * rates["prediction image"],
    }
    print("paper-scale projection (data loading overlapped, validation and checkpoint writes not counted):")
    for stage, seconds in projection.items():
        print(f"  {stage:62s} {seconds / 60:8.1f} min")
    print(f"  {'total':62s} {sum(projection.values()) / 60:8.1f} min  (goal: under 60 min on one H100-class GPU)")


if __name__ == "__main__":
    main()
