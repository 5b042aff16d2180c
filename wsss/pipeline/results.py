"""The results of a run: ``OUT/results.json`` (one row per line of the table) and the printed table."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsss.pipeline.config import PipelineConfig

SEGMENTER_METHOD = "DeepLab-LargeFOV on LayerCAM pseudo-labels"


def build_results(config: PipelineConfig, data_root: Path, manifest: Callable[[str], dict[str, Any] | None],
                  prediction_rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``OUT/results.json``: ``rows`` is the results table (one dict per line), the rest is context.

    The classifier, CAM-seed and pseudo-label rows come from those steps' manifests (``manifest(step)``),
    the segmenter rows from ``prediction_rows`` (split -> scores).
    """
    def results_of(step: str) -> dict[str, Any]:
        return (manifest(step) or {}).get("results") or {}

    rows: list[dict[str, Any]] = [{"stage": "classifier", "method": "VGG16 classifier", "metric": "mAP", "split": config.val_split,
                                   "value": results_of("classifier").get("val_mAP")}]
    for name, row in results_of("eval-cams").items():
        rows.append({"stage": "CAM seeds", "method": name, "metric": "mIoU", "split": config.eval_split, "value": row["best_miou"],
                     "best_threshold": row["best_threshold"], "miou_at_0.3": row["miou_at_0.3"]})
    for name, row in results_of("refine").items():
        rows.append({"stage": "refined seeds", "method": name, "metric": "mIoU", "split": config.eval_split, "value": row["best_miou"],
                     "best_threshold": row["best_threshold"], "miou_at_0.3": row["miou_at_0.3"]})
        rows.append({"stage": "refined labels", "method": name, "metric": "mIoU", "split": config.eval_split, "value": row["labels_miou"]})
    for name, row in results_of("eval-pseudo").items():
        rows.append({"stage": "pseudo-labels", "method": name, "metric": "mIoU", "split": config.eval_split, "value": row["miou"],
                     **{key: row[key] for key in ("labelled_share", "miou_labelled") if key in row}})
    for split, row in prediction_rows.items():
        rows.append({"stage": "segmenter", "method": SEGMENTER_METHOD, "metric": "mIoU", "split": split, "value": row["miou"]})
    return {"data_root": str(data_root), "cam_split": config.cam_split, "eval_split": config.eval_split, "val_split": config.val_split,
            "rows": rows, "note": "CAM seeds: mIoU at the best background threshold of the sweep and at 0.3; values are fractions"}


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:g}"


def results_table(results: dict[str, Any]) -> str:
    """The results table as plain text (percent)."""
    lines = [f"{'stage':<14} {'method':<44} {'split':<9} {'metric':<6} {'value':>6} {'best thr':>8} {'@0.3':>6}"]
    lines.append("-" * len(lines[0]))
    for row in results.get("rows", []):
        best = _fmt(row.get("best_threshold"), percent=False) if "best_threshold" in row else ""
        at03 = _fmt(row.get("miou_at_0.3")) if "miou_at_0.3" in row else ""
        lines.append(f"{row['stage']:<14} {row['method']:<44} {row['split']:<9} {row['metric']:<6} {_fmt(row['value']):>6} {best:>8} {at03:>6}")
        if row.get("labelled_share", 1) < 1:  # labels that leave uncertain pixels at 255 (counted as background above)
            lines.append(f"{'':<14}   labels {_fmt(row['labelled_share'])}% of the pixels; mIoU on them {_fmt(row['miou_labelled'])}")
    return "\n".join(lines)
