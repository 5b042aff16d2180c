"""``wsss make-toy-voc OUT`` (``--layout coco``: the same scenes in the COCO 2014 layout)."""
from __future__ import annotations

import argparse
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsss make-toy-voc", description="Write the built-in toy dataset (VOC2012 layout) to OUT.")
    parser.add_argument("out", help="output folder (becomes the data root)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    parser.add_argument("--num-train", type=int, default=160, help="images in train_aug (coco: train2014)")
    parser.add_argument("--num-val", type=int, default=40, help="images in val (coco: val2014)")
    parser.add_argument("--num-train-subset", type=int, default=60, help="images in train (a prefix of train_aug)")
    parser.add_argument("--layout", default="voc", choices=("voc", "coco"),
                        help="voc: VOC2012 layout, VOC class values; coco: COCO 2014 WSSS layout (train2014/, val2014/, "
                        "SegmentationClass/, cls_labels_coco.npy, ImageSets/), COCO class values")
    args = parser.parse_args(argv)
    from wsss.data.toy import make_toy_coco, make_toy_voc

    start = time.perf_counter()
    if args.layout == "coco":
        root = make_toy_coco(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val)
    else:
        root = make_toy_voc(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                            num_train_subset=min(args.num_train_subset, args.num_train))
    print(f"wrote {args.num_train + args.num_val} images to {root} in {time.perf_counter() - start:.1f}s")
    return 0
