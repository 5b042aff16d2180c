"""Evaluation stages: ``wsss evaluate`` (label PNGs vs GT) and ``wsss eval-cams`` (CAM seeds vs GT).

Both sum one confusion matrix over the whole split with :func:`wsss.metrics.confusion_matrix` and
turn it into scores with :func:`wsss.metrics.scores_from_confusion` (SPEC "Evaluation"); nothing
here counts pixels or divides by itself.

Conventions:

- GT pixels labelled 255 are ignored.
- A *prediction* pixel labelled 255 (a pseudo-label method's "don't know") is scored as
  background 0, the field's convention for evaluating pseudo-labels (IRN, AMN, ...): every
  non-ignored GT pixel is counted, so leaving pixels undecided is not rewarded.
- Predictions may be index (``L``) or palette (``P``) PNGs; palette colours are ignored.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsss.classes import IGNORE_INDEX, LABEL_NAMES, NUM_LABELS
from wsss.errors import ConfigError, DataError, name_some
from wsss.io import ensure_output_file, image_info, read_label_png, write_json
from wsss.metrics import SegmentationScores, confusion_matrix, scores_from_confusion
from wsss.parallel import chunked, parallel_imap
from wsss.pseudo import DEFAULT_THRESHOLD, cam_best_class, seed_labels_from_best
from wsss.stages.pseudo_labels import find_cam_files, load_cams

log = logging.getLogger(__name__)

_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[[*range(NUM_LABELS), IGNORE_INDEX]] = True


def read_labels(path: Path) -> np.ndarray:
    """(H, W) uint8 label map of an index/palette PNG, values checked to be 0..20 or 255.

    Faster than ``read_label_png(path)`` for 8-bit PNGs (a 256-bin count instead of a sort);
    other modes go through its full check, since converting them to uint8 could wrap values.
    """
    if image_info(path).mode not in ("P", "L"):
        return read_label_png(path)
    labels = read_label_png(path, check_values=False)
    bad = np.flatnonzero(np.bincount(labels.reshape(-1), minlength=256).astype(bool) & ~_ALLOWED)
    if bad.size:
        raise DataError(f"{path}: label values outside 0..{NUM_LABELS - 1} and {IGNORE_INDEX}: {bad[:10].tolist()}")
    return labels


def pair_confusion(pred_path: Path, gt_path: Path) -> np.ndarray:
    """(21, 21) confusion of one prediction PNG vs its GT mask (prediction 255 -> background)."""
    pred = read_labels(pred_path)
    gt = read_labels(gt_path)
    if pred.shape != gt.shape:
        raise DataError(f"{pred_path}: prediction is {pred.shape[0]}x{pred.shape[1]} but GT {gt_path} is {gt.shape[0]}x{gt.shape[1]}")
    pred = np.where(pred == IGNORE_INDEX, np.uint8(0), pred)
    return confusion_matrix(pred, gt, NUM_LABELS, IGNORE_INDEX)


def _confusion_of_chunk(pairs: list[tuple[Path, Path]]) -> tuple[int, np.ndarray]:
    total = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for pred_path, gt_path in pairs:
        total += pair_confusion(pred_path, gt_path)
    return len(pairs), total


def list_pngs(directory: Path) -> list[str]:
    """Sorted stems of the ``*.png`` files in ``directory``."""
    if not directory.is_dir():
        raise DataError(f"directory not found: {directory}")
    return sorted(p.name[:-4] for p in os.scandir(directory) if p.name.endswith(".png") and not p.name.startswith("."))


def missing_files(directory: Path, ids: Sequence[str], suffix: str = ".png") -> list[str]:
    """Ids without ``directory/<id><suffix>`` (one listdir, not one stat per id)."""
    if not directory.is_dir():
        raise DataError(f"directory not found: {directory}")
    present = {p.name for p in os.scandir(directory)}
    return [i for i in ids if f"{i}{suffix}" not in present]


def evaluate_dirs(
    pred_dir: str | Path,
    gt_dir: str | Path,
    ids: Sequence[str],
    workers: int = 1,
    skip_missing: bool = False,
    chunk_size: int = 32,
    progress: bool = False,
) -> SegmentationScores:
    """Scores of ``pred_dir/<id>.png`` against ``gt_dir/<id>.png`` over ``ids``, one summed confusion.

    Args:
        pred_dir: predictions (index or palette PNGs, values 0..20 or 255 = scored as background).
        gt_dir: ground-truth masks (255 ignored).
        ids: image ids to evaluate.
        workers: decoding processes.
        skip_missing: leave out ids without a prediction (logged) instead of raising.

    Raises:
        DataError naming the file: missing GT or prediction, size mismatch, bad values.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    ids = list(ids)
    if not ids:
        raise DataError("no image ids to evaluate")
    missing_gt = missing_files(gt_dir, ids)
    if missing_gt:
        raise DataError(f"{len(missing_gt)} ids have no GT mask in {gt_dir}: {name_some(missing_gt)}")
    missing = missing_files(pred_dir, ids)
    if missing and not skip_missing:
        raise DataError(f"{len(missing)} of {len(ids)} ids have no prediction in {pred_dir}: {name_some(missing)}")
    if missing:
        log.warning("%d ids without a prediction in %s are left out", len(missing), pred_dir)
        ids = [i for i in ids if i not in set(missing)]
        if not ids:
            raise DataError(f"no prediction in {pred_dir} for any of the listed ids")
    pairs = [(pred_dir / f"{i}.png", gt_dir / f"{i}.png") for i in ids]
    # Big chunks amortise the round trip; enough chunks to keep every worker busy.
    size = max(1, min(chunk_size, -(-len(pairs) // (4 * max(1, workers)))))
    total = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    from tqdm import tqdm

    with tqdm(total=len(pairs), desc="evaluate", unit="img", disable=not progress) as bar:
        chunks = chunked(pairs, size)
        for done, counts in parallel_imap(_confusion_of_chunk, chunks, workers):
            total += counts
            bar.update(done)
    return scores_from_confusion(total)


# --------------------------------------------------------------------------- CAM seeds


def parse_thresholds(text: str) -> list[float]:
    """``start:stop:step`` (stop included) or ``a,b,c``; 0.3 is always added. Sorted, rounded to 1e-6."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-6)) + 1
            values = [start + i * step for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--thresholds must be START:STOP:STEP (STEP > 0) or a comma list, got {text!r}") from None
    if not values or not all(np.isfinite(values)):
        raise ConfigError(f"--thresholds must be finite numbers, got {text!r}")
    return sorted({round(v, 6) for v in [*values, DEFAULT_THRESHOLD]})


def _cam_confusions(args: tuple[list[tuple[Path, Path]], list[float], str | None]) -> tuple[int, np.ndarray]:
    """(T, 21, 21) summed confusion of a chunk of (CAM file, GT mask) pairs, one per threshold."""
    pairs, thresholds, key = args
    total = np.zeros((len(thresholds), NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for cam_path, gt_path in pairs:
        cams, classes = load_cams(cam_path, key)
        gt = read_labels(gt_path)
        if cams.shape[1:] != gt.shape:
            raise DataError(f"{cam_path}: maps have spatial shape {tuple(cams.shape[1:])} but GT {gt_path} is {gt.shape[0]}x{gt.shape[1]}")
        best_score, best_label = cam_best_class(cams, classes)  # once per image, reused per threshold
        for t, threshold in enumerate(thresholds):
            total[t] += confusion_matrix(seed_labels_from_best(best_score, best_label, threshold), gt, NUM_LABELS, IGNORE_INDEX)
    return len(pairs), total


def evaluate_cams(
    cam_dir: str | Path,
    gt_dir: str | Path,
    ids: Sequence[str],
    thresholds: Sequence[float],
    key: str | None = None,
    workers: int = 1,
    chunk_size: int = 16,
    progress: bool = False,
) -> dict[float, SegmentationScores]:
    """Seed quality of CAM files: for each background threshold, scores of
    argmax([threshold, cams...]) against the GT masks, one confusion summed over ``ids``.

    ``key`` selects another (K, H, W) array of the npz (e.g. a per-layer map ``stage3``).
    Returns ``{threshold: scores}`` in the order of ``thresholds``.
    Raises DataError naming the file for missing CAMs/GT and malformed CAM files.
    """
    cam_dir, gt_dir = Path(cam_dir), Path(gt_dir)
    ids = list(ids)
    thresholds = [float(t) for t in thresholds]
    if not ids:
        raise DataError("no image ids to evaluate")
    if not thresholds:
        raise ConfigError("no thresholds given")
    cam_files, missing = find_cam_files(cam_dir, ids)
    if missing:
        raise DataError(f"{len(missing)} of {len(ids)} ids have no CAM file (<id>.npz or <id>.npy) in {cam_dir}: {name_some(missing)}")
    missing_gt = missing_files(gt_dir, ids)
    if missing_gt:
        raise DataError(f"{len(missing_gt)} ids have no GT mask in {gt_dir}: {name_some(missing_gt)}")
    pairs = [(cam_files[i], gt_dir / f"{i}.png") for i in ids]
    size = max(1, min(chunk_size, -(-len(pairs) // (4 * max(1, workers)))))
    total = np.zeros((len(thresholds), NUM_LABELS, NUM_LABELS), dtype=np.int64)
    from tqdm import tqdm

    with tqdm(total=len(pairs), desc="eval-cams", unit="img", disable=not progress) as bar:
        for done, counts in parallel_imap(_cam_confusions, [(c, thresholds, key) for c in chunked(pairs, size)], workers):
            total += counts
            bar.update(done)
    return {t: scores_from_confusion(c) for t, c in zip(thresholds, total)}


def best_threshold(results: dict[float, SegmentationScores]) -> float:
    """Threshold with the highest mIoU (the lowest such threshold on ties)."""
    return max(results, key=lambda t: (np.nan_to_num(results[t].miou, nan=-1.0), -t))


def threshold_table(results: dict[float, SegmentationScores]) -> str:
    """Plain-text table: threshold, mIoU %, pixel accuracy %, best row and 0.3 marked."""
    best = best_threshold(results)
    lines = [f"{'threshold':>9}  {'mIoU %':>7}  {'pixel acc %':>11}"]
    for t, scores in results.items():
        marks = [m for m, on in (("best", t == best), ("eq. 10 default", t == DEFAULT_THRESHOLD)) if on]
        lines.append(f"{t:>9.3f}  {100 * scores.miou:>7.2f}  {100 * scores.pixel_accuracy:>11.2f}" + (f"  <- {', '.join(marks)}" if marks else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLIs


def _ids_from(list_file: Path | None, default_dir: Path, what: str) -> list[str]:
    from wsss.data.voc import read_id_list

    if list_file is not None:
        return read_id_list(list_file)
    ids = list_pngs(default_dir) if what == "png" else sorted(
        {p.name.rsplit(".", 1)[0] for p in os.scandir(default_dir) if p.name.endswith((".npz", ".npy")) and not p.name.startswith(".")}
    )
    if not ids:
        raise DataError(f"no {what} files in {default_dir}; pass --list")
    return ids


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")


def main(argv: list[str]) -> int:
    """``wsss evaluate``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss evaluate",
        description="Per-class IoU, mIoU and pixel accuracy of a folder of label PNGs against GT masks "
        "(one confusion matrix over all images; GT 255 ignored; prediction 255 scored as background).",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of <id>.png predictions (index or palette PNGs)")
    parser.add_argument("--gt", required=True, type=Path, help="folder of <id>.png GT masks (e.g. VOC2012/SegmentationClass)")
    parser.add_argument("--list", type=Path, default=None, help="file of ids to evaluate (default: every PNG in --gt)")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    parser.add_argument("--skip-missing", action="store_true", help="leave out ids without a prediction (reported) instead of failing")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all CPUs)")
    args = parser.parse_args(argv)
    _check_workers(args.workers)
    if args.json is not None:
        ensure_output_file(args.json, "--json file")

    start = time.perf_counter()
    ids = _ids_from(args.list, args.gt, "png")
    missing = missing_files(args.pred, ids)
    if missing and not args.skip_missing:
        raise DataError(f"{len(missing)} of {len(ids)} ids have no prediction in {args.pred}: {name_some(missing)} "
                        "(pass --skip-missing to leave them out)")
    present = [i for i in ids if i not in set(missing)]
    scores = evaluate_dirs(args.pred, args.gt, present, workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    print(scores.table(LABEL_NAMES))
    print(f"{len(present)} images evaluated in {seconds:.1f}s" + (f"; {len(missing)} skipped (no prediction): {name_some(missing)}" if missing else ""))
    if args.json is not None:
        payload = {
            **scores.to_dict(LABEL_NAMES),
            "num_images": len(present),
            "skipped_missing": missing,
            "pred_dir": str(args.pred),
            "gt_dir": str(args.gt),
            "convention": "GT 255 ignored; prediction 255 scored as background (0)",
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def eval_cams_main(argv: list[str]) -> int:
    """``wsss eval-cams``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss eval-cams",
        description="Seed mIoU of CAM files against GT masks over a background-threshold sweep: "
        "background score = threshold, label = argmax over background and the image's class maps.",
    )
    parser.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz (or IRN <id>.npy) CAM files")
    parser.add_argument("--gt", required=True, type=Path, help="folder of <id>.png GT masks")
    parser.add_argument("--list", type=Path, default=None, help="file of ids (default: every CAM file in --cams)")
    parser.add_argument("--thresholds", default="0.05:0.60:0.05", help="START:STOP:STEP (STOP included) or a comma list; 0.3 is always added")
    parser.add_argument("--key", default=None, help="array to evaluate instead of 'cams', e.g. a per-layer map 'stage3'")
    parser.add_argument("--json", type=Path, default=None, help="also write per-threshold scores to this JSON file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    args = parser.parse_args(argv)
    _check_workers(args.workers)
    thresholds = parse_thresholds(args.thresholds)
    if args.json is not None:
        ensure_output_file(args.json, "--json file")

    start = time.perf_counter()
    ids = _ids_from(args.list, args.cams, "CAM")
    results = evaluate_cams(args.cams, args.gt, ids, thresholds, key=args.key, workers=args.workers, progress=True)
    best = best_threshold(results)
    print(threshold_table(results))
    print(f"{len(ids)} images ({args.key or 'cams'}) in {time.perf_counter() - start:.1f}s; best threshold {best:g}: "
          f"mIoU {100 * results[best].miou:.2f}%; at {DEFAULT_THRESHOLD:g}: {100 * results[DEFAULT_THRESHOLD].miou:.2f}%")
    if args.json is not None:
        payload = {
            "key": args.key or "cams",
            "num_images": len(ids),
            "best_threshold": best,
            "best_miou": results[best].to_dict(LABEL_NAMES)["miou"],
            "thresholds": [{"threshold": t, **s.to_dict(LABEL_NAMES)} for t, s in results.items()],
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
