"""``wsss make-toy-voc OUT``."""
from __future__ import annotations

import argparse
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsss make-toy-voc", description="Write the built-in toy dataset (VOC2012 layout) to OUT.")
    parser.add_argument("out", help="output folder (becomes the data root)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    parser.add_argument("--num-train", type=int, default=160, help="images in train_aug")
    parser.add_argument("--num-val", type=int, default=40, help="images in val")
    parser.add_argument("--num-train-subset", type=int, default=60, help="images in train (a prefix of train_aug)")
    args = parser.parse_args(argv)
    from wsss.data.toy import make_toy_voc

    start = time.perf_counter()
    root = make_toy_voc(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val, num_train_subset=min(args.num_train_subset, args.num_train))
    print(f"wrote {args.num_train + args.num_val} images to {root} in {time.perf_counter() - start:.1f}s")
    return 0
