"""Check the paper's segmenter-level claims on a finished ``wsss run``: train the run's segmenter
(same YAML, same steps) on other pseudo-labels made from the run's own CAM files, and score each on
the val split.

- Table IX: fused LayerCAM pseudo-labels vs Grad-CAM stage 5 (paper: 60.4-60.8 vs 55.6 val mIoU
  after DeepLab-LargeFOV, about +5 points).
- Table X: stage 5 < stages 5+4 < stages 5+4+3 (paper: 55.6, 57.1, 60.4).

The run's own LayerCAM 3-5 segmenter is the last row (from ``OUT/results.json``); the others are
trained here, each into ``OUT/claims/<name>/``, with the run's pseudo-label settings (eq. 10,
threshold and SLIC of the pipeline YAML). Resumable: a finished row is read back, not retrained.

Example (after `wsss run -c configs/voc_mini/pipeline.yaml --out out/voc_mini`):
  python scripts/paper_claims.py -c configs/voc_mini/pipeline.yaml --out out/voc_mini
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS = (  # (name, CAM folder, key of its files: None = the fused map, "a+b" = max of saved layers, paper val mIoU)
    ("Grad-CAM stage5", "gradcam", None, 55.6),
    ("LayerCAM stage5", "layercam", "stage5", 55.6),
    ("LayerCAM stages 4-5 fused", "layercam", "stage4+stage5", 57.1),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="the pipeline YAML of the finished run")
    parser.add_argument("--out", required=True, help="the run's output folder")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)

    from wsss.data import resolve_data_root
    from wsss.io import write_json
    from wsss.options import narrowed
    from wsss.pipeline.config import load_config
    from wsss.pipeline.steps import Run
    from wsss.stages.evaluate import evaluate_labels
    from wsss.stages.predict import PredictOptions, predict_segmentation
    from wsss.stages.pseudo_labels import PseudoLabelOptions, make_pseudo_labels
    from wsss.stages.train_segmenter import train_segmenter

    config = load_config(args.config, {"data_root": args.data_root, "out": args.out})
    out = Path(args.out)
    run = Run(config, out, resolve_data_root(config.data_root).resolve())
    val = config.val_split
    results = {}
    for name, folder, key, paper in ROWS:
        here = out / "claims" / name.replace(" ", "_")
        done = here / "scores.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            continue
        start = time.perf_counter()
        options = narrowed(config.pseudo, PseudoLabelOptions)
        make_pseudo_labels(run.data_root, out / "cams" / folder, here / "pseudo", split=config.cam_split, options=options, key=key,
                           progress=False).raise_for_failures()
        pseudo = evaluate_labels(here / "pseudo", run.layout.mask_dir, run.ids(config.eval_split))
        segmenter = run.training_config(config.segmenter, f"claims/{here.name}/segmenter", **{
            "data.train_labels": str(here / "pseudo"), "data.train_split": config.cam_split})
        train_segmenter(segmenter)
        checkpoint = here / "segmenter" / ("best.ckpt" if (here / "segmenter" / "best.ckpt").is_file() else "last.ckpt")
        predict_segmentation(checkpoint, run.data_root, here / "predictions" / val, narrowed(config.predict, PredictOptions), split=val,
                             progress=False)
        scores = evaluate_labels(here / "predictions" / val, run.layout.mask_dir, run.ids(val))
        results[name] = {"pseudo_miou": pseudo.miou, "segmenter_val_miou": scores.miou, "paper": paper,
                         "seconds": round(time.perf_counter() - start, 1)}
        write_json(done, results[name])
        print(f"{name}: pseudo-labels {100 * pseudo.miou:.1f}, segmenter val {100 * scores.miou:.1f} "
              f"({results[name]['seconds']:.0f} s)", flush=True)
    rows = json.loads((out / "results.json").read_text())["rows"]
    results["LayerCAM stages 3-5 fused (the run)"] = {
        "pseudo_miou": next(r["value"] for r in rows if r["stage"] == "pseudo-labels" and r["method"] == "LayerCAM stages 3-5 fused"),
        "segmenter_val_miou": next(r["value"] for r in rows if r["stage"] == "segmenter" and r["split"] == val), "paper": 60.4}
    write_json(out / "claims" / "claims.json", results)
    print(f"\n{'pseudo-labels from':<40} {'pseudo mIoU':>11} {'segmenter val':>13} {'paper val':>9}")
    for name, row in results.items():
        print(f"{name:<40} {100 * row['pseudo_miou']:>11.1f} {100 * row['segmenter_val_miou']:>13.1f} {row['paper']:>9.1f}")


if __name__ == "__main__":
    main()
