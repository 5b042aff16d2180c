"""The CAM and prediction stages against their models' own time, on the same photos, in one run.

``stage``: ``wsss.stages.cams.make_cams`` as ``wsss run`` calls it (LayerCAM at stages 3-5 plus the
Grad-CAM and Grad-CAM++ baselines at stage 5, three folders), everything included: decoding,
the DataLoader, maps upsampled and normalised at image size, npz writes, records.
``model``: the same classifier on the same photos, decoded and normalised beforehand (not timed),
one image at a time as the stage runs by default: ``wsss.cams.compute_cam_sets`` alone, i.e. one
forward and one activation-gradient backward per class, maps at layer resolution, nothing written.
The ratio stage/model is what the stage adds to the arithmetic it cannot avoid.

``predict``: ``wsss.stages.predict.predict_segmentation`` (scale 1, no flip, as the voc_mini preset)
against the bare DeepLab-LargeFOV forward of each decoded photo under inference mode.

The classifier is a VGG16 CAMClassifier with the given conv weights (ImageNet's, so activations
look like a real network's) and a random head, the segmenter DeepLab-LargeFOV with the same trunk
and a random head (saved as a checkpoint for the stage): time does not depend on what the head learnt; the
image-level classes come from the dataset, as in the stage.

Example: python scripts/bench_stages.py --data-root ../shared/data/voc12_mini --images 48 \
             --weights ../shared/data/weights/vgg16_imagenet_conv.pth
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="a VOC-layout folder (e.g. ../shared/data/voc12_mini)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=48, help="the first N ids of the split")
    parser.add_argument("--weights", default="none", help="VGG16 conv weights file (default: random)")
    parser.add_argument("--num-workers", type=int, default=2, help="the stage's DataLoader workers (the voc_mini preset's: 2)")
    parser.add_argument("--stages", nargs="+", default=["cams", "predict"], choices=["cams", "predict"])
    parser.add_argument("--repeats", type=int, default=1, help="passes of each; the fastest is reported")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from wsss import limit_onednn_cache

    limit_onednn_cache()  # what the stage sets; the bare run gets the same
    from wsss.cams import compute_cam_sets
    from wsss.data import open_layout
    from wsss.data.transforms import eval_transform, to_tv
    from wsss.data.voc import ImageLabels
    from wsss.formats.images import read_image
    from wsss.models.classifier import CAMClassifier
    from wsss.pipeline.config import CamsConfig
    from wsss.stages.cams import CamOptions, make_cams
    from wsss.stages.predict import PredictOptions, predict_segmentation
    from wsss.systems.checkpoints import load_segmenter
    from wsss.systems.segmenter import SegmenterSystem

    args = parse_args(argv)
    layout = open_layout(args.data_root)
    ids = layout.read_ids(args.split)[: args.images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CAMClassifier(weights=args.weights).eval()
    labels = ImageLabels(layout, "auto")
    classes = [[int(c) for c in np.flatnonzero(labels(i) > 0.5)] for i in ids]
    variants = CamsConfig().variants()  # the three folders `wsss run` writes
    requests = {"layercam": ["stage3", "stage4", "stage5"], "gradcam": ["stage5"], "gradcam++": ["stage5"]}
    transform = eval_transform()
    images = [transform(to_tv(read_image(layout.image_path(i)))[0])[None] for i in ids]  # decoded beforehand: not timed
    print(f"{len(ids)} photos of {args.split} from {layout.root}, {sum(map(len, classes))} classes in all; "
          f"threads={torch.get_num_threads()} stage num_workers={args.num_workers}")

    with tempfile.TemporaryDirectory() as scratch:
        list_file = Path(scratch) / "ids.txt"
        list_file.write_text("\n".join(ids) + "\n")
        best: dict[str, float] = {}

        def timed(name: str, work) -> None:
            start = time.perf_counter()
            work()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)

        if "predict" in args.stages:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                system = SegmenterSystem(weights=args.weights, channels_last=False)
            checkpoint = Path(scratch) / "segmenter.ckpt"
            torch.save({"state_dict": system.state_dict(), "hyper_parameters": {"weights": "none", "channels_last": False}}, checkpoint)
            segmenter = load_segmenter(checkpoint)
        for _ in range(args.repeats):
            if "cams" in args.stages:
                out = Path(scratch) / "cams"
                shutil.rmtree(out, ignore_errors=True)
                timed("cams stage", lambda: make_cams(model, layout.root, {out / name: v for name, v in variants.items()},
                                                      CamOptions(num_workers=args.num_workers), split=str(list_file), progress=False))
                timed("cams model", lambda: [compute_cam_sets(model, image, [c], requests) for image, c in zip(images, classes)])
            if "predict" in args.stages:
                out = Path(scratch) / "pred"
                shutil.rmtree(out, ignore_errors=True)
                timed("predict stage", lambda: predict_segmentation(checkpoint, layout.root, out, PredictOptions(num_workers=args.num_workers,
                                                                    accelerator="cpu", devices=1), split=str(list_file), progress=False))

                def forwards():
                    with torch.inference_mode():
                        for image in images:
                            segmenter(image)

                timed("predict model", forwards)
    for name, seconds in best.items():
        print(f"{name:14s} {seconds:8.2f} s  {seconds / len(ids):6.3f} s/photo")
    for stage in args.stages:
        print(f"{stage} stage / its model's own time: {best[stage + ' stage'] / best[stage + ' model']:.3f}")

if __name__ == "__main__":
    main()
