"""``wsss check-data ROOT``: validate a whole VOC-layout dataset up front, in parallel."""
from __future__ import annotations

import argparse
import collections
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from wsss.data import open_layout
from wsss.data.voc import DatasetLayout, ImageLabels
from wsss.errors import DataError, WsssError
from wsss.parallel import chunked
from wsss.formats.images import read_image
from wsss.formats.label_png import check_mask_size, read_label_png


def check_one(layout: DatasetLayout, image_labels: ImageLabels, image_id: str) -> list[tuple[str, str]]:
    """Problems of one image as (kind, message); empty when all is well."""
    problems: list[tuple[str, str]] = []
    try:
        image = read_image(layout.image_path(image_id))
    except DataError as exc:
        return [("image", str(exc))]
    mask_path = layout.mask_path(image_id)
    if mask_path.is_file():
        try:
            mask = read_label_png(mask_path, labels=layout.labels)
        except DataError as exc:
            problems.append(("mask", str(exc)))
        else:
            try:
                check_mask_size(mask_path, mask.shape, layout.image_path(image_id), image.shape)
            except DataError as exc:
                problems.append(("mask size", str(exc)))
    if image_labels.kind == "masks" and problems:
        return problems  # the labels would be read from the mask just reported: no second message
    try:
        if not image_labels(image_id).any():
            problems.append(("no labels", f"{image_id}: no image-level class ({image_labels.description}); CAM stages write K=0 for it"))
    except DataError as exc:
        problems.append(("labels", str(exc)))
    return problems


def _check_chunk(args: tuple[str, str, list[str]]) -> list[tuple[str, str, str]]:
    root, label_source, ids = args
    layout = open_layout(root)
    image_labels = ImageLabels(layout, label_source)
    return [(image_id, kind, message) for image_id in ids for kind, message in check_one(layout, image_labels, image_id)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsss check-data", description="Decode every listed image and mask and report all problems at once.")
    parser.add_argument("root", help="VOC2012 folder (or VOCdevkit, or its parent), a COCO 2014 folder, or 'toy'")
    parser.add_argument("--split", action="append", help="split name or list file (repeatable; default: every list in "
                        "ImageSets/Segmentation, COCO: ImageSets)")
    parser.add_argument("--labels", default="auto", help="image-level label source: auto, annotations, masks, or a cls_labels.npy")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    args = parser.parse_args(argv)

    layout = open_layout(args.root)
    image_labels = ImageLabels(layout, args.labels)
    splits = args.split or sorted(p.stem for p in layout.list_dir.glob("*.txt"))
    if not splits:
        raise DataError(f"no list files in {layout.list_dir}; pass --split")
    problems: list[tuple[str, str, str]] = []
    ids: list[str] = []
    for split in splits:
        try:
            split_ids = layout.read_ids(split)
        except WsssError as exc:
            problems.append((str(split), "list", str(exc)))
            continue
        missing = [i for i in split_ids if not layout.image_path(i).is_file()]
        problems += [(i, "missing image", f"{layout.image_path(i)}: listed in {split} but not found") for i in missing]
        absent = set(missing)
        ids += [i for i in split_ids if i not in absent]
    ids = list(dict.fromkeys(ids))  # splits overlap (train is inside train_aug)
    chunks = chunked(ids, 64)
    jobs = [(str(layout.root), str(args.labels), chunk) for chunk in chunks]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool, tqdm(total=len(ids), desc="checking", unit="img") as bar:
        for chunk, found in zip(chunks, pool.map(_check_chunk, jobs)):
            problems += found
            bar.update(len(chunk))

    print(f"\n{layout.root}: {len(ids)} images in {', '.join(map(str, splits))}; labels from {image_labels.description}")
    if not problems:
        print("no problems found")
        return 0
    by_kind = collections.Counter(kind for _, kind, _ in problems)
    print(f"{len(problems)} problems: " + ", ".join(f"{n} {kind}" for kind, n in by_kind.most_common()))
    for kind in by_kind:
        shown = [message for _, k, message in problems if k == kind]
        print(f"\n[{kind}]")
        for message in shown[:20]:
            print(f"  {message}")
        if len(shown) > 20:
            print(f"  ... and {len(shown) - 20} more")
    # "no labels" alone is a warning: such images are valid (CAM stages write K = 0).
    return 1 if any(kind != "no labels" for kind in by_kind) else 0
