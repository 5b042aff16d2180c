"""Benchmark DeepLab-LargeFOV (VGG16, full width, random weights): training iterations/s and
inference images/s at 321x321, batch 10, the paper's training shape.

Training step = forward, cross-entropy on logits upsampled to the crop (255 ignored), backward,
SGD step with DeepLab's param groups: exactly ``SegmenterSystem``'s loss and optimiser.
Inference = forward in eval mode under ``torch.inference_mode`` plus upsampling to 321x321 and
argmax. ``--warmup`` untimed iterations come first; times are wall clock with CUDA synchronised.

Examples:
  python scripts/bench_seg.py --iters 3                      # CPU, a few iterations (slow)
  python scripts/bench_seg.py --device cuda --iters 50 --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--size", type=int, default=321, help="square input side")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the paper's network)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as --trainer.precision bf16-mixed)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call, averaged over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from wsss.systems.segmenter import SegmenterSystem

    device = torch.device(args.device)
    torch.manual_seed(0)
    system = SegmenterSystem(weights="none", width=args.width, channels_last=args.channels_last).to(device)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    masks = torch.randint(0, 21, (args.batch_size, args.size, args.size), device=device)
    masks[:, :8] = 255
    optimizer = torch.optim.SGD(system.model.optimizer_param_groups(1e-3, 5e-4), lr=1e-3, momentum=0.9)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = system.loss(system(images), masks)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            logits = torch.nn.functional.interpolate(system(images).float(), size=images.shape[-2:], mode="bilinear", align_corners=True)
            logits.argmax(1)

    system.train()
    train_s = _timed(train_step, args.iters, args.warmup, device)
    system.eval()
    infer_s = _timed(infer_step, args.iters, args.warmup, device)
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "size": args.size, "width": args.width,
        "bf16": args.bf16, "channels_last": args.channels_last, "iters": args.iters,
        "train_iter_per_s": round(1 / train_s, 4), "train_images_per_s": round(args.batch_size / train_s, 3),
        "infer_images_per_s": round(args.batch_size / infer_s, 3),
        "paper_16k_iters_hours": round(16000 * train_s / 3600, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
