"""Training-step throughput of the classifier and DeepLab-LargeFOV under each speed-up, side by side.

For each model, every variant trains the same network (same seed, same weights) on the same fixed
batch for ``--steps`` SGD steps after ``--warmup`` untimed ones (which also absorb
``torch.compile``'s compilation), and the script prints seconds per step, the speed-up over
fp32, and the loss after the last step next to fp32's (a speed-up whose loss drifts is no
speed-up). Variants: fp32; bf16 autocast (Lightning's ``precision: bf16-mixed``); channels-last
memory format; ``torch.compile``; and their combinations.

The step is the systems' own: ``ClassifierSystem`` (multi-label soft-margin loss, ``frozen_stages``
as in the preset) and ``SegmenterSystem.loss`` (cross-entropy at crop resolution, 255 ignored),
with SGD momentum 0.9. Inputs are random; the weights are ``--weights`` (the real VGG16 conv file
for realistic activations) or random.

Examples:
  python scripts/bench_train.py --weights ../shared/data/weights/vgg16_imagenet_conv.pth
  python scripts/bench_train.py --models segmenter --variants fp32,bf16 --steps 3
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
import torch.nn.functional as F

VARIANTS = ("fp32", "bf16", "cl", "compile", "bf16+cl", "bf16+cl+compile")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="classifier,segmenter")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--weights", default="none", help="VGG16 weights for both models (a conv-only file works)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--classifier-batch", type=int, default=16)
    parser.add_argument("--classifier-crop", type=int, default=320)
    parser.add_argument("--classifier-frozen", type=int, default=4, help="frozen_stages of the classifier (the voc_mini preset: 4)")
    parser.add_argument("--segmenter-batch", type=int, default=8)
    parser.add_argument("--segmenter-crop", type=int, default=241)
    parser.add_argument("--segmenter-frozen", type=int, default=3)
    return parser.parse_args(argv)


def build(model: str, args: argparse.Namespace, device: torch.device):
    """(system, batch of inputs, targets, loss function) for one model, in the default memory
    format (the ``cl`` variants convert it)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if model == "classifier":
        from wsss.systems.classifier import ClassifierSystem

        system = ClassifierSystem(weights=args.weights, frozen_stages=args.classifier_frozen, channels_last=False)
        size, batch = args.classifier_crop, args.classifier_batch
        targets = (torch.rand(batch, 20, generator=generator) < 0.1).float()
        loss = lambda s, x, y: F.multilabel_soft_margin_loss(s(x).float(), y)  # noqa: E731
    else:
        from wsss.systems.segmenter import SegmenterSystem

        system = SegmenterSystem(weights=args.weights, frozen_stages=args.segmenter_frozen, channels_last=False)
        size, batch = args.segmenter_crop, args.segmenter_batch
        targets = torch.randint(0, 21, (batch, size, size), generator=generator)
        loss = lambda s, x, y: s.loss(s(x), y)  # noqa: E731
    images = torch.randn(batch, 3, size, size, generator=generator)
    return system.to(device), images.to(device), targets.to(device), loss


def run_variant(variant: str, base, images, targets, loss_fn, args, device) -> tuple[float, float]:
    """(seconds per step, loss after the last step) of one variant, on a copy of ``base``."""
    system = copy.deepcopy(base).train()
    channels_last = "cl" in variant.split("+")
    if channels_last:
        system = system.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(system) if "compile" in variant else system
    optimizer = torch.optim.SGD([p for p in system.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext():
            loss = loss_fn(forward, images, targets)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps, last


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} steps={args.steps} warmup={args.warmup}")
    for model in args.models.split(","):
        base, images, targets, loss_fn = build(model, args, device)
        print(f"== {model}: batch {images.shape[0]}, {images.shape[-1]}x{images.shape[-2]}, weights {args.weights}")
        results = {}
        for variant in variants:
            try:
                results[variant] = run_variant(variant, base, images, targets, loss_fn, args, device)
            except Exception as exc:  # e.g. torch.compile without a working compiler: report, go on
                print(f"{variant:18s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            seconds, loss = results[variant]
            ratio = f"x{results['fp32'][0] / seconds:.2f} vs fp32" if "fp32" in results else ""
            drift = f"(fp32 {results['fp32'][1]:.4f})" if "fp32" in results and variant != "fp32" else ""
            print(f"{variant:18s} {seconds:7.3f} s/step  {ratio:14s} loss after {args.warmup + args.steps} steps {loss:.4f} {drift}", flush=True)


if __name__ == "__main__":
    main()
