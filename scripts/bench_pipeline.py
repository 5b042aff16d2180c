"""Time every stage of the pipeline per image or per step on this machine's accelerator, and project
the paper-scale schedule from those rates.

Paper scale (configs/pipeline.yaml): VOC 2012 train_aug, 10,582 images; classifier 15 epochs at
batch 16, crop 448; CAMs of train_aug (LayerCAM stages 3-5 plus Grad-CAM and Grad-CAM++ stage 5,
one pass) at VOC size 375x500; pseudo-labels (SLIC + eq. 10 on CPU worker processes); DeepLab-
LargeFOV 16,000 steps at batch 10, crop 321; prediction of val's 1,449 images. The refinement is
timed too and projected apart with the settings of configs/pipeline_refine.yaml, read from it
(AffinityNet steps, batch, crop, trunk; the walk's steps, radius, stride; its CAM folders).

Each stage runs the real code on inputs of the real shapes: the ``ClassifierSystem`` and
``SegmenterSystem`` training steps (forward, loss, backward, SGD step), ``compute_cam_sets``,
``superpixel_labels`` with SLIC on a 375x500 image, ``image_probabilities``, the ``AffinitySystem``
training step and ``RefinePredictor.refine``. Weights are random
(``--weights`` for a real file); timing does not depend on them. Not timed: data loading and
JPEG decoding (DataLoader workers overlap them with the steps on a GPU machine), checkpoint
writes and validation passes (a few minutes in all); the projection says so.

Examples:
  python scripts/bench_pipeline.py                                  # cuda if present; bf16 where the training stages use it
  python scripts/bench_pipeline.py --device cpu --steps 1 --workers 2
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PAPER = {"train_images": 10582, "classifier_epochs": 15, "classifier_batch": 16, "classifier_crop": 448,
         "segmenter_steps": 16000, "segmenter_batch": 10, "segmenter_crop": 321, "val_images": 1449}
REFINE_PRESET = Path(__file__).resolve().parents[1] / "configs" / "pipeline_refine.yaml"
IMAGE = (375, 500)
CLASSES_PER_IMAGE = (1, 2, 1, 3)  # cycled; VOC train_aug averages ~1.5 classes per image


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (or images) per stage, after one warm-up")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="autocast dtype of training and prediction; auto: bf16 where the training stages use it "
                             "(wsss.trainers.default_precision: a GPU or CPU with native bf16), else fp32")
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


def training_step_seconds(parameters, loss_of_batch, steps: int, device: torch.device, autocast) -> float:
    """Seconds per SGD step (forward and loss under ``autocast``, backward, update)."""
    optimizer = torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of_batch()
        loss.backward()
        optimizer.step()

    return timed(step, steps, device)


def classifier_and_cam_rates(args, device: torch.device, autocast) -> tuple[dict[str, float], torch.nn.Module]:
    """The classifier's training step and the CAM pass per image; also the classifier's trunk, on
    which the refinement's AffinityNet runs."""
    from wsss.cams import compute_cam_sets
    from wsss.systems.classifier import ClassifierSystem

    classifier = ClassifierSystem(weights=args.weights, channels_last=args.channels_last).to(device).train()
    images = torch.randn(PAPER["classifier_batch"], 3, PAPER["classifier_crop"], PAPER["classifier_crop"], device=device)
    targets = (torch.rand(PAPER["classifier_batch"], 20, device=device) < 0.1).float()
    rates = {"classifier step": training_step_seconds(
        classifier.parameters(), lambda: F.multilabel_soft_margin_loss(classifier(images).float(), targets), args.steps, device, autocast)}
    model = classifier.model.eval()  # NHWC with --channels-last, as `cams --channels-last` runs it
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = torch.randn(args.cam_batch, 3, *IMAGE, device=device).contiguous(memory_format=memory_format)
    classes = [list(range(CLASSES_PER_IMAGE[n % len(CLASSES_PER_IMAGE)])) for n in range(args.cam_batch)]
    requests = {"layercam": ["stage3", "stage4", "stage5"], "gradcam": ["stage5"], "gradcam++": ["stage5"]}
    rates["CAM image"] = timed(lambda: compute_cam_sets(model, batch, classes, requests), args.steps, device) / args.cam_batch
    return rates, model.features


def refine_options():
    """The refine section of configs/pipeline_refine.yaml (:class:`wsss.stages.refine.RefineOptions`)."""
    from wsss.pipeline.config import load_config

    return load_config(REFINE_PRESET).refine


def refine_rates(args, device: torch.device, autocast, trunk: torch.nn.Module, options) -> dict[str, float]:
    """The AffinityNet training step and one image's random walk with the refine ``options``."""
    from wsss.systems.affinity import AffinitySystem, RefinePredictor

    affinity = AffinitySystem(trunk, options.stride, options.train_radius, options.embedding, options.frozen_trunk, options.lr,
                              options.weight_decay, options.momentum, options.kind)
    affinity = affinity.to(device).train()
    crops = torch.randn(options.batch_size, 3, options.crop_size, options.crop_size, device=device)
    seeds = torch.randint(0, 3, (options.batch_size, options.crop_size, options.crop_size), device=device)
    seeds[seeds == 2] = 255  # a third of the pixels between the two thresholds: no seed
    with warnings.catch_warnings():  # training_step's self.log outside a Trainer
        warnings.simplefilter("ignore")
        rates = {"affinity step": training_step_seconds(
            [p for p in affinity.parameters() if p.requires_grad],
            lambda: affinity.training_step({"image": crops, "mask": seeds}, 0), args.steps, device, autocast)}
    predictor = RefinePredictor(affinity.model, options.kind, options.radius, options.beta, options.iterations, options.normalisation,
                                options.flip, options.label_threshold, options.bg_power, options.edge_product).to(device)
    image = torch.randn(3, *IMAGE, device=device)
    cams = torch.rand(CLASSES_PER_IMAGE[1], *IMAGE, device=device)

    def refine_image():
        with torch.inference_mode(), autocast():
            predictor.refine(image, cams, np.arange(1, len(cams) + 1))

    rates["refine image (1 CAM folder)"] = timed(refine_image, args.steps, device)
    return rates


def pseudo_label_rate(args) -> float:
    from wsss.pseudo import superpixel_labels

    rng = np.random.default_rng(0)
    photo = (rng.random((*IMAGE, 3)) * 255).astype(np.uint8)
    cams = rng.random((2, *IMAGE)).astype(np.float32)
    return timed(lambda: superpixel_labels(photo, cams, [3, 7]), args.steps, torch.device("cpu"))


def segmenter_rates(args, device: torch.device, autocast) -> dict[str, float]:
    from wsss.segmentation import image_probabilities
    from wsss.systems.segmenter import SegmenterSystem

    segmenter = SegmenterSystem(weights=args.weights, channels_last=args.channels_last).to(device).train()
    crops = torch.randn(PAPER["segmenter_batch"], 3, PAPER["segmenter_crop"], PAPER["segmenter_crop"], device=device)
    masks = torch.randint(0, 21, (PAPER["segmenter_batch"], PAPER["segmenter_crop"], PAPER["segmenter_crop"]), device=device)
    rates = {"segmenter step": training_step_seconds(
        segmenter.model.optimizer_param_groups(1e-3, 5e-4), lambda: segmenter.loss(segmenter(crops), masks), args.steps, device, autocast)}
    segmenter.eval()
    image = torch.randn(3, *IMAGE, device=device)

    def predict():
        with torch.inference_mode(), autocast():
            image_probabilities(segmenter, image).argmax(0)

    rates["prediction image"] = timed(predict, args.steps, device)
    return rates


def main(argv=None) -> None:
    from wsss.trainers import default_precision

    args = parse_args(argv)
    device = torch.device(args.device)
    if args.precision == "auto":  # emulated bf16 on a CPU without its instructions is several times slower
        args.precision = "bf16" if default_precision(device.type) == "bf16-mixed" else "fp32"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    refine = refine_options()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.precision}; channels_last={args.channels_last}; {args.steps} timed steps each")
    rates: dict[str, float] = {}

    def report(measured: dict[str, float]) -> None:  # as each stage ends: a long CPU run shows its progress
        rates.update(measured)
        for stage, seconds in measured.items():
            print(f"  {stage:36s} {seconds:8.3f} s", flush=True)

    measured, trunk = classifier_and_cam_rates(args, device, autocast)
    report(measured)
    report(refine_rates(args, device, autocast, trunk, refine))
    del trunk
    report({"pseudo-label image (1 CPU process)": pseudo_label_rate(args)})
    report(segmenter_rates(args, device, autocast))
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
    trunk_state = "frozen" if refine.frozen_trunk else "trained"
    refinement = {
        f"affinity: {refine.max_steps:,} steps (batch {refine.batch_size}, crop {refine.crop_size}, {trunk_state} trunk)":
            refine.max_steps * rates["affinity step"],
        f"random walk: {len(refine.variants)} CAM folders of {PAPER['train_images']:,} images, {refine.iterations} steps":
            len(refine.variants) * PAPER["train_images"] * rates["refine image (1 CAM folder)"],
    }
    print(f"{REFINE_PRESET.relative_to(REFINE_PRESET.parents[1])} adds:")
    for stage, seconds in refinement.items():
        print(f"  {stage:62s} {seconds / 60:8.1f} min")
    print(f"  {'total with the refinement':62s} {(sum(projection.values()) + sum(refinement.values())) / 60:8.1f} min")


if __name__ == "__main__":
    main()
