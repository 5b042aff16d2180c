"""The walk of one trained affinity net, re-run with one change at a time (the README's refinement
ablation): a `wsss refine` folder's net (OUT/affinity/finished.ckpt and the options its record
holds) on the first --limit images of --split, each --variant's label PNG rule scored against the
masks, with the refined maps' best background threshold beside it. Nothing is written.

    python scripts/refine_ablation.py --refined out/voc_mini_refine/refined/layercam \\
        --cams out/voc_mini_refine/cams/layercam --checkpoint out/voc_mini_refine/classifier/best.ckpt \\
        --data-root ../shared/data/voc12_mini --split train --limit 128 \\
        --variant reference --variant per_class:normalisation=per_class --variant short:iterations=16

A variant is NAME[:key=value,...] over RefineOptions' walk fields (radius, beta, iterations,
normalisation, flip, edge_product, label_threshold, bg_power), plus ``thin_path=1``, which puts back
the path `wsss refine` used before it followed IRN (one cell per step of the longer axis).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

WALK_FIELDS = ("radius", "beta", "iterations", "normalisation", "flip", "edge_product", "label_threshold", "bg_power")
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 16))


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, settings = text.partition(":")
    changes: dict[str, object] = {}
    for pair in filter(None, settings.split(",")):
        key, _, value = pair.partition("=")
        if key not in (*WALK_FIELDS, "thin_path"):
            raise SystemExit(f"--variant {text}: {key!r} is not a walk option ({', '.join(WALK_FIELDS)}, thin_path)")
        changes[key] = value if key == "normalisation" else float(value)
    return name, changes


@contextlib.contextmanager
def thin_paths(on: bool):
    """Patch the pre-IRN path in for one variant (the module function the affinities call)."""
    import wsss.affinity as affinity

    saved = affinity.path_points

    def thin(offset):
        dy, dx = offset
        steps = max(abs(dy), abs(dx))
        return list(dict.fromkeys((round(k * dy / steps), round(k * dx / steps)) for k in range(steps + 1)))

    try:
        if on:
            affinity.path_points = thin
        yield
    finally:
        affinity.path_points = saved


def main(argv: list[str]) -> int:
    from wsss.data import open_layout
    from wsss.formats.cams import find_cam_files
    from wsss.formats.label_png import read_label_png
    from wsss.formats.torch_files import read_checkpoint
    from wsss.metrics import confusion_matrix, scores_from_confusion
    from wsss.pseudo import cam_best_class, seed_labels_from_best
    from wsss.records import read_record
    from wsss.stages.refine import RefineDataset, RefineOptions
    from wsss.systems.affinity import AffinitySystem, RefinePredictor
    from wsss.systems.checkpoints import load_classifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refined", type=Path, required=True, help="a wsss refine output folder (its affinity/finished.ckpt)")
    parser.add_argument("--cams", type=Path, required=True, help="the CAM folder it refined")
    parser.add_argument("--checkpoint", required=True, help="the classifier that made the CAMs")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=128, help="the first N ids of the split")
    parser.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...] (module docstring)")
    args = parser.parse_args(argv)

    record = read_record(args.refined / "affinity")
    fields = {f.name for f in dataclasses.fields(RefineOptions)}
    options = RefineOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["params"].items() if k in fields},
                            accelerator="cpu")
    saved = read_checkpoint(args.refined / "affinity" / "finished.ckpt")
    system = AffinitySystem(load_classifier(args.checkpoint).features, **saved["hyper_parameters"])
    system.load_state_dict(saved["state_dict"])
    layout = open_layout(args.data_root)
    ids = layout.read_ids(args.split)[:args.limit]
    cam_files, missing = find_cam_files(args.cams, ids)
    if missing:
        raise SystemExit(f"{len(missing)} ids have no CAM file in {args.cams}")
    dataset = RefineDataset(layout, ids, cam_files)
    num_labels = layout.num_classes + 1
    masks = [read_label_png(layout.mask_path(i), labels=layout.labels) for i in ids]
    print(f"{options.kind} net of {args.refined} ({saved.get('global_step')} steps), {len(ids)} {args.split} images")
    print("| variant | label PNGs mIoU | refined maps best mIoU (threshold) | s/image |")
    print("| --- | --- | --- | --- |")
    for text in args.variant or ["reference"]:
        name, changes = parse_variant(text)
        walk = {k: (bool(v) if k in ("flip", "edge_product") else int(v) if k in ("radius", "iterations") else v)
                for k, v in changes.items() if k in WALK_FIELDS}
        variant = dataclasses.replace(options, **walk)
        predictor = RefinePredictor(system.model, variant.kind, variant.radius, variant.beta, variant.iterations, variant.normalisation,
                                    variant.flip, variant.label_threshold, variant.bg_power, variant.edge_product)
        label_confusion = np.zeros((num_labels, num_labels), np.int64)
        sweep = {t: np.zeros((num_labels, num_labels), np.int64) for t in THRESHOLDS}
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in options.resolved_precision() else contextlib.nullcontext()
        with thin_paths(bool(changes.get("thin_path", 0))), torch.no_grad(), autocast:
            for index in range(len(dataset)):
                item = dataset[index]
                [result] = predictor.predict_step({k: [v] for k, v in item.items()}, index)
                gt = masks[index]
                label_confusion += confusion_matrix(result["labels"], gt, num_labels)
                best_score, best_label = cam_best_class(result["cams"], result["classes"])
                for t in THRESHOLDS:
                    sweep[t] += confusion_matrix(seed_labels_from_best(best_score, best_label, t), gt, num_labels)
        seconds = (time.perf_counter() - start) / len(ids)
        best = max(THRESHOLDS, key=lambda t: scores_from_confusion(sweep[t]).miou)
        print(f"| {name} {changes or ''} | {100 * scores_from_confusion(label_confusion).miou:.1f} | "
              f"{100 * scores_from_confusion(sweep[best]).miou:.1f} ({best:g}) | {seconds:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
