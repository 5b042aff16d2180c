"""The steps of ``wsss run``: each calls one stage function with paths under ``OUT`` and returns
what its manifest records (``counts``, ``results``).

Steps meet only through files (the layout is in the README); :data:`STEPS` says, for each, the
config section and earlier steps its hash covers, the outputs a fresh start clears and how to tell
they are all there.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.classes import LABEL_SETS, NUM_CLASSES
from wsss.data import open_layout
from wsss.data.voc import DatasetLayout
from wsss.errors import ConfigError, DataError, name_some
from wsss.options import OptionError, narrowed, read_yaml, result_params
from wsss.pipeline.config import PipelineConfig, TrainingSection
from wsss.pipeline.manifest import read_manifest
from wsss.pipeline.results import build_results
from wsss.systems.predictors import CamVariant
from wsss.trainers import is_global_zero

SECTIONS_WITH_OPTIONS = ("cams", "eval_cams", "refine", "pseudo", "predict")  # the training sections are hashed by training_options
SEED_ROWS = (  # (row name, CAM folder, npz key: None = the file's fused map, "a+b" = max of saved layers)
    ("Grad-CAM stage5", "gradcam", None),
    ("Grad-CAM++ stage5", "gradcampp", None),
    ("LayerCAM stage5", "layercam", "stage5"),
    ("LayerCAM stage4", "layercam", "stage4"),
    ("LayerCAM stage3", "layercam", "stage3"),
    ("LayerCAM stages 4-5 fused", "layercam", "stage4+stage5"),
    ("LayerCAM stages 3-5 fused", "layercam", None),
)
PSEUDO_ROWS = (("Grad-CAM stage5", "gradcam"), ("Grad-CAM++ stage5", "gradcampp"), ("LayerCAM stages 3-5 fused", "layercam"))
# In the segmenter section, `model.weights: classifier` starts the segmenter's trunk from this run's
# classifier (the toy preset's stand-in for ImageNet initialisation, which the toy data has none of).
THIS_RUNS_CLASSIFIER = "classifier"


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"data.batch_size": 4, "model": {"width": 0.5}}`` -> ``{"data": {"batch_size": 4}, "model": {"width": 0.5}}``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = _merged(target.get(last, {}), _nested(value)) if isinstance(value, Mapping) else value
    return nested


def _merged(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mappings merged key by key (later values win, as later options do)."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), dict) else value
    return merged


@dataclass
class Run:
    """What every step reads: the configuration, the output folder and the dataset. ``quiet``: print
    nothing (a DDP process other than the first, running one step)."""

    config: PipelineConfig
    out: Path
    data_root: Path
    quiet: bool = False
    _ids: dict[str, list[str]] = field(default_factory=dict)
    _data_identities: dict[tuple, str] = field(default_factory=dict)

    def say(self, text: str) -> None:
        if not self.quiet and is_global_zero():
            print(text, flush=True)

    @functools.cached_property
    def layout(self) -> DatasetLayout:
        return open_layout(self.data_root)

    def gt_dir(self, ids: list[str]) -> Path:
        """The folder of the GT masks of ``ids`` (COCO keeps train2014's and val2014's apart)."""
        return self.layout.mask_dir_for(ids)

    def ids(self, split: str) -> list[str]:
        if split not in self._ids:
            self._ids[split] = self.layout.read_ids(split)
        return self._ids[split]

    def data_identity(self, splits: Sequence[str], masks: bool = False) -> str:
        """What the steps reading ``splits`` read of the dataset, independent of where it lies: each
        split's ids, the byte size of every image (and mask, with ``masks``), and the image-level
        labels (:meth:`ImageLabels.identity`). A moved or copied dataset is the same data."""
        from wsss.data.voc import ImageLabels
        from wsss.pipeline.manifest import digest

        key = (tuple(splits), masks)
        if key not in self._data_identities:
            sizes = {}
            for split in splits:
                ids = self.ids(split)
                files = [self.layout.image_path(i) for i in ids] + ([self.layout.mask_path(i) for i in ids] if masks else [])
                sizes[split] = [ids, [path.stat().st_size if path.is_file() else None for path in files]]
            identity = {"splits": sizes, "labels": ImageLabels(self.layout, self.config.cams.labels).identity()}
            if self.layout.labels != LABEL_SETS["voc"]:  # VOC's classes, the only ones before label sets, hash as before
                identity["label_set"] = dataclasses.asdict(self.layout.labels)
            self._data_identities[key] = digest(identity)
        return self._data_identities[key]

    def cam_variants(self) -> dict[str, CamVariant]:
        """CAM folder -> variant: ``layercam`` and one folder per baseline."""
        return self.config.cams.variants()

    def has_layers(self, folder: str, key: str | None) -> bool:
        """Whether the CAM files of ``folder`` hold the (``+``-joined) per-layer arrays ``key``."""
        variant = self.cam_variants()[folder]
        return key is None or all(layer in (variant.layers if variant.save_layers else ()) for layer in key.split("+"))

    def pseudo_variants(self) -> list[str]:
        return [name for _, name in PSEUDO_ROWS if name in self.cam_variants()]

    def refined_variants(self) -> list[str]:
        """CAM folders the refine step refines (none when it is off)."""
        refine = self.config.refine
        return [v for v in refine.variants if v in self.cam_variants()] if refine.enabled else []

    def pseudo_source(self, folder: str) -> Path:
        """The CAM folder the pseudo-labels of ``folder`` are made from: its refined maps when refined."""
        return self.out / "refined" / folder / "cams" if folder in self.refined_variants() else self.out / "cams" / folder

    def prediction_splits(self) -> list[str]:
        """Splits the segmenter predicts and is scored on: ``predict.splits``, by default val and eval."""
        return list(dict.fromkeys(self.config.predict.splits or (self.config.val_split, self.config.eval_split)))

    def training_config(self, section: TrainingSection, folder: str, **pipeline_values: Any) -> dict[str, Any]:
        """A training stage's configuration: its YAML, the section's overrides, then what the run
        sets (data, output folders; ``ckpt_path`` to the last.ckpt of an interrupted run, which a
        fresh start would have cleared)."""
        values = _merged(_nested(section.overrides), _nested({
            **pipeline_values,
            "data.root": str(self.data_root), "data.val_split": self.config.val_split,
            "checkpoint.dirpath": str(self.out / folder), "trainer.logger.init_args.save_dir": str(self.out / "logs"),
        }))
        last = self.out / folder / "last.ckpt"
        if last.is_file():
            values["ckpt_path"] = str(last)
        return _merged(read_yaml(section.config, f"{folder} stage config"), values)

    def classifier_config(self) -> dict[str, Any]:
        # The dataset's label set sizes both networks (VOC 20 + background, COCO 80 + background).
        return self.training_config(self.config.classifier, "classifier", **{"model.num_classes": self.layout.num_classes})

    def segmenter_config(self) -> dict[str, Any]:
        weights = {}
        if _nested(self.config.segmenter.overrides).get("model", {}).get("weights") == THIS_RUNS_CLASSIFIER:
            weights = {"model.weights": f"classifier:{self.out / 'classifier' / 'best.ckpt'}"}
        return self.training_config(self.config.segmenter, "segmenter", **weights, **{
            "data.train_labels": str(self.out / "pseudo" / "layercam"), "data.train_split": self.config.cam_split,
            "model.num_classes": self.layout.labels.num_labels})


def check_extras(run: Run) -> None:
    """ConfigError now, not hours in, when a step's option needs an optional package that is missing."""
    from wsss.crf import CRF_INSTALL_HINT, crf_available

    refine = run.config.refine
    wanted = [name for name, on in (("pseudo.crf", run.config.pseudo.crf), ("predict.crf", run.config.predict.crf),
                                    ("refine.seeds: crf", refine.enabled and refine.seeds == "crf")) if on]
    if wanted and not crf_available():
        raise ConfigError(f"{' and '.join(wanted)}: {CRF_INSTALL_HINT}")


def check_splits(run: Run) -> None:
    """ConfigError before any step when ``eval_split`` holds ids that ``cam_split`` has not: the
    seed and pseudo-label scores read CAMs made only for ``cam_split``."""
    cam_ids = set(run.ids(run.config.cam_split))
    outside = [i for i in run.ids(run.config.eval_split) if i not in cam_ids]
    if outside:
        raise ConfigError(f"eval_split {run.config.eval_split!r} has {len(outside)} ids that cam_split {run.config.cam_split!r} has not "
                          f"({name_some(outside)}): the CAMs are made for cam_split only; choose an eval_split inside it")


def check_training_configs(run: Run) -> None:
    """Parse both training stages' configurations now: a misspelt key in the segmenter section must
    not wait for the classifier, CAM and pseudo-label steps to finish before it is reported."""
    from wsss.stages.train_classifier import check_classifier_config
    from wsss.stages.train_segmenter import check_segmenter_config

    for section, check, config in (("classifier", check_classifier_config, run.classifier_config()),
                                   ("segmenter", check_segmenter_config, run.segmenter_config())):
        try:
            check(config)
        except ConfigError as exc:
            raise ConfigError(f"'{section}' section: {exc}") from None


# ----------------------------------------------------------------------------- the steps


def _best_score(run: Run, folder: str) -> float | None:
    from wsss.systems.checkpoints import checkpoint_score

    best = run.out / folder / "best.ckpt"
    return checkpoint_score(best) if best.is_file() else None


def train_classifier_step(run: Run) -> dict[str, Any]:
    from wsss.stages.train_classifier import train_classifier

    train_classifier(run.classifier_config())
    best = run.out / "classifier" / "best.ckpt"
    if not best.is_file():
        raise DataError(f"train-cls finished without writing {best} (did validation run? check trainer options)")
    return {"counts": {"checkpoints": 2}, "results": {"val_mAP": _best_score(run, "classifier")}}


def cams_step(run: Run) -> dict[str, Any]:
    from wsss.stages.cams import CamOptions, make_cams

    variants = run.cam_variants()
    for name, variant in variants.items():
        run.say(f"  cams/{name}: {variant.method} at {','.join(variant.layers)}")
    counts = make_cams(run.out / "classifier" / "best.ckpt", run.data_root, {run.out / "cams" / name: v for name, v in variants.items()},
                       narrowed(run.config.cams, CamOptions), split=run.config.cam_split, progress=False)
    return {"counts": {name: dataclasses.asdict(counts[run.out / "cams" / name]) for name in variants}}


def eval_cams_step(run: Run) -> dict[str, Any]:
    from wsss.pseudo import DEFAULT_THRESHOLD
    from wsss.stages.eval_cams import best_threshold, evaluate_cams, parse_thresholds

    thresholds = parse_thresholds(run.config.eval_cams.thresholds)  # checked when the config loaded
    ids = run.ids(run.config.eval_split)
    rows = {}
    for row, folder, key in SEED_ROWS:
        if folder not in run.cam_variants() or not run.has_layers(folder, key):
            continue
        scores = evaluate_cams(run.out / "cams" / folder, run.gt_dir(ids), ids, thresholds, key=key, workers=run.config.eval_cams.workers, labels=run.layout.labels)
        best = best_threshold(scores)
        rows[row] = {"best_threshold": best, "best_miou": float(scores[best].miou), "miou_at_0.3": float(scores[DEFAULT_THRESHOLD].miou)}
        run.say(f"  {row}: mIoU {100 * rows[row]['best_miou']:.1f} at {best:g}, {100 * rows[row]['miou_at_0.3']:.1f} at 0.3")
    return {"counts": {"images": len(ids)}, "results": rows}


def refine_step(run: Run) -> dict[str, Any]:
    """Affinity + random walk refinement of each of ``refine.variants``, then the seed sweep of the
    refined maps and the mIoU of its label PNGs on ``eval_split``."""
    from wsss.pseudo import DEFAULT_THRESHOLD
    from wsss.stages.eval_cams import best_threshold, evaluate_cams, parse_thresholds
    from wsss.stages.evaluate import evaluate_labels
    from wsss.stages.refine import RefineOptions, make_refined_cams, summary_dict

    c = run.config.refine
    counts, rows = {}, {}
    thresholds = parse_thresholds(run.config.eval_cams.thresholds)
    ids = run.ids(run.config.eval_split)
    for folder in run.refined_variants():
        seeds = {}
        if c.thresholds_from_seeds:
            best = seed_threshold(run, folder)
            seeds = {"bg_threshold": round(c.bg_factor * best, 6), "fg_threshold": round(min(0.95, c.fg_factor * best), 6)}
        try:
            options = narrowed(c, RefineOptions, **seeds)
        except OptionError as exc:
            raise ConfigError(f"refine.{exc.name} {exc.problem} ({folder})") from None
        out = run.out / "refined" / folder
        summary = make_refined_cams(run.out / "classifier" / "best.ckpt", run.data_root, run.out / "cams" / folder, out, options,
                                    split=run.config.cam_split, progress=False)
        run.say(f"  refined/{folder}: seeds below {options.bg_threshold:g} / from {options.fg_threshold:g}; {summary.line()}")
        counts[folder] = summary_dict(summary)
        scores = evaluate_cams(out / "cams", run.gt_dir(ids), ids, thresholds, workers=run.config.eval_cams.workers, labels=run.layout.labels)
        best = best_threshold(scores)
        labels = evaluate_labels(out / "labels", run.gt_dir(ids), ids, labels=run.layout.labels)
        row = seed_row(folder)
        rows[refined_row(row)] = {"best_threshold": best, "best_miou": float(scores[best].miou),
                                        "miou_at_0.3": float(scores[DEFAULT_THRESHOLD].miou), "labels_miou": float(labels.miou),
                                        "seed_thresholds": [options.bg_threshold, options.fg_threshold]}
        run.say(f"  refined {row}: mIoU {100 * scores[best].miou:.1f} at {best:g}; label PNGs {100 * labels.miou:.1f}")
    return {"counts": counts, "results": rows}


def pseudo_labels_step(run: Run) -> dict[str, Any]:
    from wsss.stages.pseudo_labels import PseudoLabelOptions, make_pseudo_labels

    c = run.config.pseudo
    counts, thresholds = {}, {}
    for name in run.pseudo_variants():
        thresholds[name] = seed_threshold(run, name, refined=name in run.refined_variants()) if c.threshold_from_seeds else c.threshold
        try:
            options = narrowed(c, PseudoLabelOptions, threshold=thresholds[name])
        except OptionError as exc:
            raise ConfigError(f"pseudo.{exc.name} {exc.problem} (the threshold of {name})") from None
        summary = make_pseudo_labels(run.data_root, run.pseudo_source(name), run.out / "pseudo" / name, split=run.config.cam_split,
                                     options=options, progress=False)
        run.say(f"  pseudo/{name}: threshold {thresholds[name]:g}; {summary.line()}")
        summary.raise_for_failures()
        counts[name] = {"written": summary.written, "skipped": summary.skipped_existing}
    return {"counts": counts, "thresholds": thresholds}


def seed_row(folder: str) -> str | None:
    """The results row of ``folder``'s maps in the seed sweep (``None``: a folder the sweep has no row of)."""
    return next((row for row, name, key in SEED_ROWS if name == folder and key is None), None)


def refined_row(row: str) -> str:
    """The results row of ``row``'s maps after the refine step."""
    return f"{row} + affinity RW"


def seed_threshold(run: Run, folder: str, refined: bool = False) -> float:
    """The best background threshold of ``folder``'s fused maps in this run's seed sweep (eval-cams),
    or of its refined maps (the refine step's sweep)."""
    step = "refine" if refined else "eval-cams"
    results = (read_manifest(run.out, step) or {}).get("results") or {}
    row = refined_row(seed_row(folder)) if refined else seed_row(folder)
    if row not in results:
        raise DataError(f"threshold from seeds: {step} has no seed sweep of {folder} ({row!r}); rerun with --from {step}")
    return float(results[row]["best_threshold"])


def eval_pseudo_step(run: Run) -> dict[str, Any]:
    from wsss.stages.evaluate import evaluate_label_maps

    ids = run.ids(run.config.eval_split)
    rows = {}
    for row, folder in PSEUDO_ROWS:
        if folder in run.pseudo_variants():
            row = refined_row(row) if folder in run.refined_variants() else row
            scores = evaluate_label_maps(run.out / "pseudo" / folder, run.gt_dir(ids), ids, labels=run.layout.labels)
            rows[row] = {"miou": float(scores.scores.miou), "labelled_share": scores.labelled_share,
                         "miou_labelled": float(scores.labelled.miou)}
            run.say(f"  {row}: pseudo-label mIoU {100 * scores.scores.miou:.1f}")
    return {"counts": {"images": len(ids)}, "results": rows}


def train_segmenter_step(run: Run) -> dict[str, Any]:
    from wsss.stages.train_segmenter import train_segmenter

    train_segmenter(run.segmenter_config())
    best = run.out / "segmenter" / "best.ckpt"
    return {"counts": {"checkpoints": 2 if best.is_file() else 1}, "results": {"val_mIoU": _best_score(run, "segmenter")}}


def predict_step(run: Run) -> dict[str, Any]:
    from wsss.stages.predict import PredictOptions, predict_segmentation

    checkpoint = run.out / "segmenter" / "best.ckpt"
    if not checkpoint.is_file():  # a segmenter config without validation writes none: say which one predicts
        checkpoint = run.out / "segmenter" / "last.ckpt"
        run.say(f"  predict: no best.ckpt (no validation ran in the segmenter's training): predicting with {checkpoint}")
    counts = {}
    for split in run.prediction_splits():
        predict_segmentation(checkpoint, run.data_root, run.out / "predictions" / split, narrowed(run.config.predict, PredictOptions),
                             split=split, progress=False)
        counts[split] = len(run.ids(split))
    return {"counts": counts}


def evaluate_step(run: Run) -> dict[str, Any]:
    from wsss.io import write_json
    from wsss.stages.evaluate import evaluate_labels

    rows = {}
    for split in run.prediction_splits():
        scores = evaluate_labels(run.out / "predictions" / split, run.gt_dir(run.ids(split)), run.ids(split), labels=run.layout.labels)
        rows[split] = {"miou": float(scores.miou), "pixel_accuracy": float(scores.pixel_accuracy)}
    write_json(run.out / "results.json", build_results(run.config, run.data_root, lambda step: read_manifest(run.out, step), rows))
    return {"counts": {split: len(run.ids(split)) for split in rows}, "results": rows}


# ----------------------------------------------------------------------------- the table of steps


def _all_files(run: Run, folder: str, names: Mapping[str, list[str]], suffix: str) -> bool:
    return all((run.out / folder / sub / f"{i}{suffix}").is_file() for sub, ids in names.items() for i in ids)


def _weights_identity(run: Run, weights: Any) -> Any:
    """A ``model.weights`` value as the step hash sees it: a file by its bytes, this run's
    classifier by name (the classifier step's hash covers it), ``imagenet``/``none`` as they are."""
    from wsss.records import file_digest

    text = str(weights)
    if text.startswith("classifier:"):
        return "this run's classifier" if Path(text.split(":", 1)[1]).resolve() == (run.out / "classifier" / "best.ckpt").resolve() else \
            f"classifier sha256:{file_digest(text.split(':', 1)[1])}"
    path = Path(text).expanduser()
    return f"sha256:{file_digest(path)}" if path.is_file() else weights


# Model options a training stage gained after run folders existed: at their default they hash as if
# absent, so an older folder's step stays up to date (it was made with that default).
OPTIONS_ADDED_LATER: dict[str, dict[str, Any]] = {"classifier": {"num_classes": NUM_CLASSES}}


def training_options(run: Run, name: str) -> dict[str, Any]:
    """What a training step's hash covers: the stage's configuration as its parser resolves it
    (every default filled in; not the YAML's text or path), less the settings that only log or
    save (:data:`~wsss.trainers.RESULT_NEUTRAL_TRAINING_KEYS`) and the paths the run sets, with
    the weights file by its bytes and the data by :meth:`Run.data_identity`."""
    from wsss.stages.train_classifier import STAGE as CLASSIFIER
    from wsss.stages.train_segmenter import STAGE as SEGMENTER
    from wsss.trainers import RESULT_NEUTRAL_TRAINING_KEYS, resolved_config

    config = run.classifier_config() if name == "classifier" else run.segmenter_config()
    config.pop("ckpt_path", None)  # whether the run resumes, not what it trains
    resolved = resolved_config(CLASSIFIER if name == "classifier" else SEGMENTER, config)
    for dotted in RESULT_NEUTRAL_TRAINING_KEYS:
        *parents, last = dotted.split(".")
        section = resolved
        for parent in parents:
            section = section.get(parent, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict):
            section.pop(last, None)
    model, data = resolved.get("model", {}), resolved.get("data", {})
    for key, default in OPTIONS_ADDED_LATER.get(name, {}).items():
        if model.get(key) == default:
            model.pop(key)
    if "weights" in model:
        model["weights"] = _weights_identity(run, model["weights"])
    data.pop("root", None)
    image_labels = data.pop("labels", None)
    if name == "classifier":
        # The data identity holds the CAM step's image labels (cams.labels); the classifier's own
        # source is hashed too where it names other labels (annotations vs masks, another table).
        from wsss.data.voc import ImageLabels

        own = ImageLabels(run.layout, image_labels or "auto").identity()
        if own != ImageLabels(run.layout, run.config.cams.labels).identity():
            resolved["image_labels"] = own
    if name == "segmenter":
        data.pop("train_labels", None)  # this run's pseudo-labels: the pseudo-labels step's hash covers them
        splits = [run.config.cam_split, run.config.val_split]
    else:
        splits = [data.get("train_split", "train"), run.config.val_split]
    resolved["data_identity"] = run.data_identity(splits, masks=True)
    return resolved


@dataclass(frozen=True)
class Step:
    """One step of ``wsss run``: the stage call and what the run needs to know about it."""

    name: str
    run: Callable[[Run], dict[str, Any]]
    section: str | None  # the config section its hash covers
    deps: tuple[str, ...]  # the steps whose outputs it reads (their hashes are part of its own)
    outputs: Callable[[Run], list[Path]] = lambda run: []  # what a fresh start clears
    complete: Callable[[Run], bool] = lambda run: True  # whether all its outputs are on disk
    also_hashed: Callable[[Run], dict[str, Any]] = lambda run: {}  # other settings it depends on
    enabled: Callable[[Run], bool] = lambda run: True  # an optional step that is off runs nothing and has no manifest


STEPS = (
    Step("classifier", train_classifier_step, "classifier", (),
         outputs=lambda run: [run.out / "classifier", run.out / "logs" / "classifier"],
         complete=lambda run: all((run.out / "classifier" / name).is_file() for name in ("best.ckpt", "last.ckpt")),
         also_hashed=lambda run: {"training": training_options(run, "classifier")}),
    Step("cams", cams_step, "cams", ("classifier",), outputs=lambda run: [run.out / "cams"],
         complete=lambda run: _all_files(run, "cams", {v: run.ids(run.config.cam_split) for v in run.cam_variants()}, ".npz"),
         also_hashed=lambda run: {"split": run.config.cam_split, "data": run.data_identity([run.config.cam_split])}),
    Step("eval-cams", eval_cams_step, "eval_cams", ("cams",),
         also_hashed=lambda run: {"split": run.config.eval_split, "data": run.data_identity([run.config.eval_split], masks=True)}),
    Step("refine", refine_step, "refine", ("classifier", "cams", "eval-cams"), outputs=lambda run: [run.out / "refined"],
         complete=lambda run: _all_files(run, "refined", {f"{v}/cams": run.ids(run.config.cam_split) for v in run.refined_variants()}, ".npz"),
         also_hashed=lambda run: {"split": run.config.cam_split, "eval_split": run.config.eval_split,
                                  "data": run.data_identity([run.config.cam_split, run.config.eval_split], masks=True)},
         enabled=lambda run: run.config.refine.enabled),
    Step("pseudo-labels", pseudo_labels_step, "pseudo", ("cams", "eval-cams", "refine"), outputs=lambda run: [run.out / "pseudo"],
         complete=lambda run: _all_files(run, "pseudo", {v: run.ids(run.config.cam_split) for v in run.pseudo_variants()}, ".png"),
         also_hashed=lambda run: {"split": run.config.cam_split, "data": run.data_identity([run.config.cam_split])}),
    Step("eval-pseudo", eval_pseudo_step, None, ("pseudo-labels",),
         also_hashed=lambda run: {"split": run.config.eval_split, "data": run.data_identity([run.config.eval_split], masks=True)}),
    Step("segmenter", train_segmenter_step, "segmenter", ("pseudo-labels",),
         outputs=lambda run: [run.out / "segmenter", run.out / "logs" / "segmenter"],
         complete=lambda run: (run.out / "segmenter" / "last.ckpt").is_file(),
         also_hashed=lambda run: {"training": training_options(run, "segmenter")}),
    Step("predict", predict_step, "predict", ("segmenter",), outputs=lambda run: [run.out / "predictions"],
         complete=lambda run: _all_files(run, "predictions", {s: run.ids(s) for s in run.prediction_splits()}, ".png"),
         also_hashed=lambda run: {"splits": run.prediction_splits(), "data": run.data_identity(run.prediction_splits())}),
    Step("evaluate", evaluate_step, None, ("predict", "eval-cams", "eval-pseudo", "classifier"), outputs=lambda run: [run.out / "results.json"],
         complete=lambda run: (run.out / "results.json").is_file(),
         also_hashed=lambda run: {"splits": run.prediction_splits(), "data": run.data_identity(run.prediction_splits(), masks=True)}),
)
STAGES = tuple(step.name for step in STEPS)
STEP_BY_NAME = {step.name: step for step in STEPS}


def hashed_payload(step: Step, run: Run, hashes: Mapping[str, str]) -> dict[str, Any]:
    """Everything ``step``'s results depend on: its config section's result-changing options
    (resolved values; resource settings left out), the hashes of the steps it reads, and the data
    and other settings it names. Manifests keep it, so ``--explain`` can say what changed. A step
    that is off is ``{"stage": name, "off": True}``."""
    if not step.enabled(run):
        return {"stage": step.name, "off": True}
    section = result_params(getattr(run.config, step.section)) if step.section in SECTIONS_WITH_OPTIONS else None
    return {"stage": step.name, "section": section, "deps": {d: hashes[d] for d in step.deps}, **step.also_hashed(run)}
