"""``wsss run`` and ``wsss demo``: every stage in order, in one process, from one YAML.

Stages meet only through files under ``OUT`` (the layout is in the README). Each stage keeps a
manifest ``OUT/manifests/<stage>.json`` with a hash of its own config section and the hashes of
the stages it reads from; a stage whose manifest says ``finished`` with the current hash, and whose
outputs are all on disk, is skipped. Changing one option therefore re-runs that stage and the
stages after it, nothing else. A stage that was interrupted (manifest present with the same hash,
not finished) resumes: the CAM, pseudo-label and prediction stages skip complete files, the
classifier and segmenter continue from their last.ckpt. A stage whose hash changed, or that is
forced (``--from``/``--force``), starts from an empty output folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss.errors import ConfigError, DataError, WsssError
from wsss.io import write_json

log = logging.getLogger(__name__)

STAGES = ("classifier", "cams", "eval-cams", "pseudo-labels", "eval-pseudo", "segmenter", "predict", "evaluate")
# stage -> the stages whose outputs it reads (their hashes are part of its own)
DEPENDS: dict[str, tuple[str, ...]] = {
    "classifier": (),
    "cams": ("classifier",),
    "eval-cams": ("cams",),
    "pseudo-labels": ("cams",),
    "eval-pseudo": ("pseudo-labels",),
    "segmenter": ("pseudo-labels",),
    "predict": ("segmenter",),
    "evaluate": ("predict", "eval-cams", "eval-pseudo", "classifier"),
}
# CAM variants: output folder -> (method, layers, scaled layers, save per-layer maps)
BASELINES = {"gradcam": "gradcam", "gradcam++": "gradcampp"}
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

DEFAULTS: dict[str, Any] = {
    "data_root": "toy",
    "out": "out",
    "cam_split": "train_aug",
    "eval_split": "train",
    "val_split": "val",
    "classifier": {"config": None},
    "cams": {
        "layers": ["stage3", "stage4", "stage5"],
        "scaled": ["stage3"],
        "gamma": 2.0,
        "scales": [1.0],
        "flip": False,
        "baselines": ["gradcam", "gradcam++"],
        "labels": "auto",
        "batch_size": 1,
        "num_workers": 2,
        "accelerator": "auto",
        "devices": 1,
    },
    "eval_cams": {"thresholds": "0.05:0.95:0.05", "workers": 1},
    "pseudo": {"threshold": 0.3, "n_segments": None, "compactness": None, "sigma": None, "workers": 1},
    "segmenter": {"config": None},
    "predict": {"splits": None, "scales": [1.0], "flip": False, "batch_size": 1, "num_workers": 2, "accelerator": "auto"},
}
# In the segmenter section, `model.weights: classifier` starts the segmenter's trunk from this run's
# classifier (the toy preset's stand-in for ImageNet initialisation, which the toy data has none of).
THIS_RUNS_CLASSIFIER = "classifier"
FREE_SECTIONS = ("classifier", "segmenter")  # LightningCLI overrides: any key, checked by the stage itself
SECTION_OF = {"classifier": "classifier", "cams": "cams", "eval-cams": "eval_cams", "pseudo-labels": "pseudo",
              "eval-pseudo": None, "segmenter": "segmenter", "predict": "predict", "evaluate": None}


# ----------------------------------------------------------------------------- configuration


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline YAML merged over :data:`DEFAULTS`; unknown keys are a ConfigError listing the valid ones.

    ``config:`` paths of the classifier/segmenter sections are resolved relative to the YAML's folder.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(DEFAULTS)}")
    config: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = raw.get(key, default)
        if isinstance(default, dict):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: '{key}' must be a mapping, got {value!r}")
            if key not in FREE_SECTIONS:
                bad = sorted(set(value) - set(default))
                if bad:
                    raise ConfigError(f"{path}: unknown key(s) {bad} in '{key}'; valid keys: {sorted(default)}")
            value = {**default, **value}
        elif value is None or (isinstance(value, (dict, list))):
            raise ConfigError(f"{path}: '{key}' must be a single value, got {value!r}")
        else:
            value = str(value)
        config[key] = value
    for section in FREE_SECTIONS:
        stage_config = config[section].get("config")
        if stage_config is None:
            raise ConfigError(f"{path}: '{section}.config' must name the stage YAML (e.g. configs/toy/{section}.yaml)")
        resolved = (path.parent / str(stage_config)).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{path}: {section}.config {stage_config} not found (paths are relative to {path.parent})")
        config[section]["config"] = str(resolved)
    _check_values(config, path)
    return config


def _check_values(config: dict[str, Any], path: Path) -> None:
    from wsss.cams import METHODS

    cams = config["cams"]
    for name in ("layers", "scaled", "scales", "baselines"):
        if not isinstance(cams[name], list):
            raise ConfigError(f"{path}: cams.{name} must be a list, got {cams[name]!r}")
    if not cams["layers"]:
        raise ConfigError(f"{path}: cams.layers must not be empty")
    bad = [b for b in cams["baselines"] if b not in BASELINES]
    if bad:
        raise ConfigError(f"{path}: cams.baselines {bad} unknown; choose from {sorted(BASELINES)} (methods: {list(METHODS)})")
    threshold = config["pseudo"]["threshold"]
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"{path}: pseudo.threshold must be a finite number, got {threshold!r}")
    splits = config["predict"]["splits"]
    if splits is not None and (not isinstance(splits, list) or not splits):
        raise ConfigError(f"{path}: predict.splits must be a non-empty list of split names, got {splits!r}")
    for section in ("cams", "predict"):
        scales = config[section]["scales"]
        if not isinstance(scales, list) or not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
            raise ConfigError(f"{path}: {section}.scales must be a list of positive numbers, got {scales!r}")


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def cli_overrides(section: dict[str, Any]) -> list[str]:
    """``{model: {width: 0.125}, "data.batch_size": 4}`` -> ``["--model.width", "0.125", "--data.batch_size", "4"]``."""
    argv: list[str] = []
    for key, value in _flatten("", {k: v for k, v in section.items() if k != "config"}):
        argv += [f"--{key}", _cli_value(value)]
    return argv


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- manifests


def read_manifest(out: Path, stage: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / "manifests" / f"{stage}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    config: dict[str, Any]
    out: Path
    data_root: Path
    hashes: dict[str, str] = field(default_factory=dict)
    _ids: dict[str, list[str]] = field(default_factory=dict)

    # -- helpers
    @functools.cached_property
    def layout(self):
        from wsss.data.voc import VOCLayout

        return VOCLayout(self.data_root)

    def ids(self, split: str) -> list[str]:
        if split not in self._ids:
            self._ids[split] = self.layout.read_ids(split)
        return self._ids[split]

    @property
    def gt_dir(self) -> Path:
        return self.layout.mask_dir

    def cam_variants(self) -> dict[str, dict[str, Any]]:
        cams = self.config["cams"]
        variants = {"layercam": {"method": "layercam", "layers": tuple(cams["layers"]), "scaled_layers": tuple(cams["scaled"]), "save_layers": True}}
        for method in cams["baselines"]:
            variants[BASELINES[method]] = {"method": method, "layers": ("stage5",), "scaled_layers": (), "save_layers": False}
        return variants

    def has_layers(self, folder: str, key: str | None) -> bool:
        """Whether the CAM files of ``folder`` hold the (``+``-joined) per-layer arrays ``key``."""
        saved = self.cam_variants()[folder]["layers"] if self.cam_variants()[folder]["save_layers"] else ()
        return key is None or all(layer in saved for layer in key.split("+"))

    def pseudo_variants(self) -> list[str]:
        return [name for _, name in PSEUDO_ROWS if name in self.cam_variants()]

    def prediction_splits(self) -> list[str]:
        """Splits the segmenter predicts and is scored on: ``predict.splits``, by default val and eval."""
        splits = self.config["predict"]["splits"] or [self.config["val_split"], self.config["eval_split"]]
        return list(dict.fromkeys(str(s) for s in splits))

    def stage_hash(self, stage: str) -> str:
        c = self.config
        section = SECTION_OF[stage]
        payload: dict[str, Any] = {"stage": stage, "section": c[section] if section else None,
                                   "deps": {d: self.hashes[d] for d in DEPENDS[stage]}}
        if stage == "classifier":
            payload["data_root"] = str(self.data_root)
            payload["val_split"] = c["val_split"]
        if stage in ("classifier", "segmenter"):
            payload["stage_yaml"] = Path(c[stage]["config"]).read_text(encoding="utf-8")
            payload["section"] = {k: v for k, v in c[stage].items() if k != "config"}
        if stage in ("cams", "pseudo-labels"):
            payload["split"] = c["cam_split"]
        if stage in ("eval-cams", "eval-pseudo"):
            payload["split"] = c["eval_split"]
        if stage == "segmenter":
            payload["splits"] = [c["cam_split"], c["val_split"]]
        if stage in ("predict", "evaluate"):
            payload["splits"] = self.prediction_splits()
        return _digest(payload)

    # -- outputs: folder(s) a forced/changed stage clears, and the completeness check
    def outputs(self, stage: str) -> list[Path]:
        o = self.out
        return {
            "classifier": [o / "classifier", o / "logs" / "classifier"],
            "cams": [o / "cams"],
            "pseudo-labels": [o / "pseudo"],
            "segmenter": [o / "segmenter", o / "logs" / "segmenter"],
            "predict": [o / "predictions"],
            "evaluate": [o / "results.json"],
        }.get(stage, [])

    def complete(self, stage: str) -> bool:
        o = self.out
        if stage == "classifier":
            return (o / "classifier" / "best.ckpt").is_file() and (o / "classifier" / "last.ckpt").is_file()
        if stage == "cams":
            return all((o / "cams" / v / f"{i}.npz").is_file() for v in self.cam_variants() for i in self.ids(self.config["cam_split"]))
        if stage == "pseudo-labels":
            return all((o / "pseudo" / v / f"{i}.png").is_file() for v in self.pseudo_variants() for i in self.ids(self.config["cam_split"]))
        if stage == "segmenter":
            return (o / "segmenter" / "last.ckpt").is_file()
        if stage == "predict":
            return all((o / "predictions" / s / f"{i}.png").is_file() for s in self.prediction_splits() for i in self.ids(s))
        if stage == "evaluate":
            return (o / "results.json").is_file()
        return True  # evaluation stages: their numbers live in the manifest

    # -- the stages
    def classifier_argv(self) -> list[str]:
        section = self.config["classifier"]
        return ["-c", section["config"], *cli_overrides(section), "--data.root", str(self.data_root),
                "--data.val_split", self.config["val_split"],
                "--checkpoint.dirpath", str(self.out / "classifier"),
                "--trainer.logger.init_args.save_dir", str(self.out / "logs")]

    def segmenter_argv(self) -> list[str]:
        section = self.config["segmenter"]
        overrides = cli_overrides(section)
        for index in range(0, len(overrides), 2):  # `model.weights: classifier` = this run's stage-1 classifier
            if overrides[index] == "--model.weights" and overrides[index + 1] == THIS_RUNS_CLASSIFIER:
                overrides[index + 1] = f"classifier:{self.out / 'classifier' / 'best.ckpt'}"
        return ["-c", section["config"], *overrides, "--data.root", str(self.data_root),
                "--data.train_labels", str(self.out / "pseudo" / "layercam"),
                "--data.train_split", self.config["cam_split"], "--data.val_split", self.config["val_split"],
                "--checkpoint.dirpath", str(self.out / "segmenter"),
                "--trainer.logger.init_args.save_dir", str(self.out / "logs")]

    def check_training_options(self) -> None:
        """Parse both training stages' options now: a misspelt key in the segmenter section must
        not wait for the classifier, CAM and pseudo-label stages to finish before it is reported."""
        from wsss.stages.train_classifier import check_classifier_config
        from wsss.stages.train_segmenter import check_segmenter_config

        for section, check, argv in (("classifier", check_classifier_config, self.classifier_argv()),
                                     ("segmenter", check_segmenter_config, self.segmenter_argv())):
            try:
                check(argv)
            except ConfigError as exc:
                raise ConfigError(f"'{section}' section: {exc}") from None

    def run_classifier(self) -> dict[str, Any]:
        from wsss.stages.train_classifier import train_classifier

        train_classifier([*self.classifier_argv(), *resume_argv(self.out / "classifier")])
        best = self.out / "classifier" / "best.ckpt"
        if not best.is_file():
            raise DataError(f"train-cls finished without writing {best} (did validation run? check trainer options)")
        return {"counts": {"checkpoints": 2}, "results": {"val_mAP": checkpoint_score(best)}}

    def run_cams(self) -> dict[str, Any]:
        from wsss.stages.cams import make_cams

        c = self.config["cams"]
        counts = {}
        for name, variant in self.cam_variants().items():
            print(f"  cams/{name}: {variant['method']} at {','.join(variant['layers'])}", flush=True)
            result = make_cams(
                self.out / "classifier" / "best.ckpt", self.data_root, self.out / "cams" / name, split=self.config["cam_split"],
                labels=c["labels"], method=variant["method"], layers=variant["layers"], scaled_layers=variant["scaled_layers"],
                gamma=float(c["gamma"]), scales=tuple(float(s) for s in c["scales"]), flip=bool(c["flip"]),
                batch_size=int(c["batch_size"]), num_workers=int(c["num_workers"]), save_layers=variant["save_layers"],
                overwrite=False, accelerator=str(c["accelerator"]), devices=c["devices"], progress=False,
            )
            counts[name] = dataclasses.asdict(result)
        return {"counts": counts}

    def run_eval_cams(self) -> dict[str, Any]:
        from wsss.stages.eval_cams import best_threshold, evaluate_cams, parse_thresholds

        c = self.config["eval_cams"]
        thresholds = parse_thresholds(str(c["thresholds"]))
        ids = self.ids(self.config["eval_split"])
        rows = {}
        for row, folder, key in SEED_ROWS:
            if folder not in self.cam_variants() or not self.has_layers(folder, key):
                continue
            scores = evaluate_cams(self.out / "cams" / folder, self.gt_dir, ids, thresholds, key=key, workers=int(c["workers"]))
            best = best_threshold(scores)
            rows[row] = {"best_threshold": best, "best_miou": float(scores[best].miou), "miou_at_0.3": float(scores[0.3].miou)}
            print(f"  {row}: mIoU {100 * rows[row]['best_miou']:.1f} at {best:g}, {100 * rows[row]['miou_at_0.3']:.1f} at 0.3")
        return {"counts": {"images": len(ids)}, "results": rows}

    def run_pseudo(self) -> dict[str, Any]:
        from wsss.stages.pseudo_labels import PseudoLabelParams, make_pseudo_labels

        c = self.config["pseudo"]
        slic = {k: c[k] for k in ("n_segments", "compactness", "sigma") if c[k] is not None}
        counts = {}
        for name in self.pseudo_variants():
            params = PseudoLabelParams(threshold=float(c["threshold"]), slic=slic)
            summary = make_pseudo_labels(self.data_root, self.out / "cams" / name, self.out / "pseudo" / name, split=self.config["cam_split"],
                                         params=params, workers=int(c["workers"]), progress=False)
            print(f"  pseudo/{name}: {summary.line()}")
            summary.raise_for_failures()
            counts[name] = {"written": summary.written, "skipped": summary.skipped_existing}
        return {"counts": counts}

    def run_eval_pseudo(self) -> dict[str, Any]:
        from wsss.stages.evaluate import evaluate_labels

        ids = self.ids(self.config["eval_split"])
        rows = {}
        for row, folder in PSEUDO_ROWS:
            if folder in self.pseudo_variants():
                scores = evaluate_labels(self.out / "pseudo" / folder, self.gt_dir, ids)
                rows[row] = {"miou": float(scores.miou)}
                print(f"  {row}: pseudo-label mIoU {100 * scores.miou:.1f}")
        return {"counts": {"images": len(ids)}, "results": rows}

    def run_segmenter(self) -> dict[str, Any]:
        from wsss.stages.train_segmenter import train_segmenter

        train_segmenter([*self.segmenter_argv(), *resume_argv(self.out / "segmenter")])
        best = self.out / "segmenter" / "best.ckpt"
        return {"counts": {"checkpoints": 2 if best.is_file() else 1},
                "results": {"val_mIoU": checkpoint_score(best) if best.is_file() else None}}

    def segmenter_checkpoint(self) -> Path:
        best = self.out / "segmenter" / "best.ckpt"
        return best if best.is_file() else self.out / "segmenter" / "last.ckpt"

    def run_predict(self) -> dict[str, Any]:
        from wsss.stages.predict import predict_segmentation

        c = self.config["predict"]
        counts = {}
        for split in self.prediction_splits():
            predict_segmentation(self.segmenter_checkpoint(), self.data_root, self.out / "predictions" / split, split=split,
                                 scales=tuple(float(s) for s in c["scales"]), flip=bool(c["flip"]), batch_size=int(c["batch_size"]),
                                 num_workers=int(c["num_workers"]), accelerator=str(c["accelerator"]), devices=1, progress=False)
            counts[split] = len(self.ids(split))
        return {"counts": counts}

    def run_evaluate(self) -> dict[str, Any]:
        from wsss.stages.evaluate import evaluate_labels

        rows = {}
        for split in self.prediction_splits():
            scores = evaluate_labels(self.out / "predictions" / split, self.gt_dir, self.ids(split))
            rows[split] = {"miou": float(scores.miou), "pixel_accuracy": float(scores.pixel_accuracy)}
        results = build_results(self, rows)
        write_json(self.out / "results.json", results)
        return {"counts": {split: len(self.ids(split)) for split in rows}, "results": rows}


def checkpoint_score(path: Path) -> float | None:
    """The ModelCheckpoint ``best_model_score`` stored in a Lightning checkpoint (val mAP / val mIoU)."""
    from wsss.systems.checkpoints import checkpoint_score as stored_score

    return stored_score(path)


def resume_argv(checkpoint_dir: Path) -> list[str]:
    """``--ckpt_path DIR/last.ckpt`` if an interrupted run of a training stage left one there.

    run_pipeline empties the folder unless the stage resumes (same hash, not forced), so a
    last.ckpt found here belongs to an earlier run of this very configuration.
    """
    last = checkpoint_dir / "last.ckpt"
    return ["--ckpt_path", str(last)] if last.is_file() else []


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:g}"


def build_results(pipeline: Pipeline, prediction_rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``OUT/results.json``: ``rows`` is the results table (one dict per line), the rest is context."""
    c = pipeline.config
    manifests = {s: read_manifest(pipeline.out, s) or {} for s in STAGES}
    rows: list[dict[str, Any]] = []
    mAP = (manifests["classifier"].get("results") or {}).get("val_mAP")
    rows.append({"stage": "classifier", "method": "VGG16 classifier", "metric": "mAP", "split": c["val_split"], "value": mAP})
    for name, row in (manifests["eval-cams"].get("results") or {}).items():
        rows.append({"stage": "CAM seeds", "method": name, "metric": "mIoU", "split": c["eval_split"], "value": row["best_miou"],
                     "best_threshold": row["best_threshold"], "miou_at_0.3": row["miou_at_0.3"]})
    for name, row in (manifests["eval-pseudo"].get("results") or {}).items():
        rows.append({"stage": "pseudo-labels", "method": name, "metric": "mIoU", "split": c["eval_split"], "value": row["miou"]})
    for split, row in prediction_rows.items():
        rows.append({"stage": "segmenter", "method": "DeepLab-LargeFOV on LayerCAM pseudo-labels", "metric": "mIoU",
                     "split": split, "value": row["miou"]})
    return {"data_root": str(pipeline.data_root), "cam_split": c["cam_split"], "eval_split": c["eval_split"],
            "val_split": c["val_split"], "rows": rows,
            "note": "CAM seeds: mIoU at the best background threshold of the sweep and at 0.3; values are fractions"}


def results_table(results: dict[str, Any]) -> str:
    """The results table as plain text (percent)."""
    lines = [f"{'stage':<14} {'method':<44} {'split':<9} {'metric':<6} {'value':>6} {'best thr':>8} {'@0.3':>6}"]
    lines.append("-" * len(lines[0]))
    for row in results.get("rows", []):
        best = _fmt(row.get("best_threshold"), percent=False) if "best_threshold" in row else ""
        at03 = _fmt(row.get("miou_at_0.3")) if "miou_at_0.3" in row else ""
        lines.append(f"{row['stage']:<14} {row['method']:<44} {row['split']:<9} {row['metric']:<6} {_fmt(row['value']):>6} {best:>8} {at03:>6}")
    return "\n".join(lines)


RUNNERS = {
    "classifier": Pipeline.run_classifier, "cams": Pipeline.run_cams, "eval-cams": Pipeline.run_eval_cams,
    "pseudo-labels": Pipeline.run_pseudo, "eval-pseudo": Pipeline.run_eval_pseudo, "segmenter": Pipeline.run_segmenter,
    "predict": Pipeline.run_predict, "evaluate": Pipeline.run_evaluate,
}


def _clear(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_pipeline(config: dict[str, Any], start_from: str | None = None, force: bool = False, until: str | None = None) -> dict[str, Any]:
    """Run every stage that is not up to date, stopping after ``until`` if given.

    Returns the results table (the contents of ``OUT/results.json`` when the run got that far).
    """
    from wsss.data import resolve_data_root
    from wsss.io import ensure_output_dir

    for option, stage in (("--from", start_from), ("--until", until)):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"{option} {stage!r}: choose from {', '.join(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1
    out = ensure_output_dir(config["out"])
    data_root = resolve_data_root(config["data_root"]).resolve()
    pipeline = Pipeline(config, out, data_root)
    pipeline.check_training_options()
    forced = set(STAGES) if force else set(STAGES[STAGES.index(start_from):]) if start_from else set()
    total = time.perf_counter()
    print(f"wsss run: data {data_root}, output {out.resolve()}", flush=True)
    for number, stage in enumerate(STAGES[:last + 1], 1):
        digest = pipeline.stage_hash(stage)
        pipeline.hashes[stage] = digest
        manifest = read_manifest(out, stage)
        banner = f"[{number}/{len(STAGES)}] {stage}"
        if (stage not in forced and manifest and manifest.get("finished") is True and manifest.get("hash") == digest
                and pipeline.complete(stage)):
            print(f"{banner}: skipped (up to date)", flush=True)
            continue
        resume = stage not in forced and manifest is not None and manifest.get("hash") == digest
        if not resume:
            _clear(pipeline.outputs(stage))
        print(f"{banner}: running{' (resuming)' if resume else ''}", flush=True)
        record = {"stage": stage, "hash": digest, "deps": {d: pipeline.hashes[d] for d in DEPENDS[stage]},
                  "config": config[SECTION_OF[stage]] if SECTION_OF[stage] else None, "finished": False}
        write_json(out / "manifests" / f"{stage}.json", record)
        start = time.perf_counter()
        try:
            produced = RUNNERS[stage](pipeline)
        except WsssError as exc:
            raise StageError(stage, exc) from exc
        except BaseException:
            print(f"wsss run: stage '{stage}' failed (earlier stages' outputs are kept; rerun to resume)", file=sys.stderr, flush=True)
            raise
        seconds = time.perf_counter() - start
        write_json(out / "manifests" / f"{stage}.json", {**record, **produced, "seconds": round(seconds, 2), "finished": True,
                                                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{banner}: done in {seconds:.1f}s", flush=True)
    if STAGES[last] == "evaluate":
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        print(f"wsss run: finished in {time.perf_counter() - total:.1f}s; results in {out / 'results.json'}\n")
    else:
        results = build_results(pipeline, {})
        print(f"wsss run: stopped after '{STAGES[last]}' in {time.perf_counter() - total:.1f}s\n")
    print(results_table(results), flush=True)
    return results


class StageError(WsssError):
    """A stage failed with a user-facing error; the message names the stage."""

    def __init__(self, stage: str, cause: Exception):
        super().__init__(f"stage '{stage}' failed: {cause} (earlier stages' outputs are kept; fix and rerun to resume)")
        self.stage = stage


# ----------------------------------------------------------------------------- entry points


def main(argv: list[str]) -> int:
    """``wsss run``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss run",
        description="Run every stage (classifier, cams, eval-cams, pseudo-labels, eval-pseudo, segmenter, predict, evaluate) "
        "from one YAML; stages whose outputs are up to date are skipped.",
    )
    parser.add_argument("-c", "--config", required=True, help="pipeline YAML (e.g. configs/pipeline.yaml)")
    parser.add_argument("--data-root", default=None, help="overrides data_root of the config ('toy' = built-in toy dataset)")
    parser.add_argument("--out", default=None, help="overrides out of the config (output folder)")
    parser.add_argument("--from", dest="start_from", default=None, choices=STAGES, help="re-run this stage and every later one")
    parser.add_argument("--until", default=None, choices=STAGES, help="stop after this stage")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    config = load_config(args.config, {"data_root": args.data_root, "out": args.out})
    quiet_library_logs()
    run_pipeline(config, args.start_from, args.force, args.until)
    return 0


def quiet_library_logs() -> None:
    """Keep a whole-pipeline run readable: Lightning's per-Trainer banners (devices, tips, model
    summaries) and the stages' per-validation tables repeat for every stage; the run prints its
    own progress and one results table. Warnings and errors still show."""
    import pytorch_lightning  # noqa: F401  (its import sets its logger to INFO: import first, then quiet it)

    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "wsss.stages", "wsss.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # Lightning's own, once per Trainer
    # The stages' LightningCLIs get their options from the pipeline, not from `wsss run`'s sys.argv.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def default_toy_config() -> Path:
    path = Path(__file__).resolve().parent.parent / "configs" / "toy" / "pipeline.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: `wsss demo` needs the repository's configs/ folder (install with pip install -e .)")
    return path


def demo_main(argv: list[str]) -> int:
    """``wsss demo``: the whole pipeline on the built-in toy dataset in a few minutes on a CPU."""
    from wsss.data import resolve_data_root

    parser = argparse.ArgumentParser(prog="wsss demo", description="Generate the toy dataset and run the whole pipeline on it "
                                     "(configs/toy/pipeline.yaml): a few minutes on 2 CPU cores, no data, no internet.")
    parser.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = resolve_data_root("toy")
    print(f"wsss demo: toy dataset at {root}", flush=True)
    config = load_config(default_toy_config(), {"data_root": str(root), "out": args.out})
    quiet_library_logs()
    run_pipeline(config, force=args.force)
    from wsss.report import write_report

    print(f"report: {write_report(args.out, root)}")
    print(f"wsss demo: done in {time.perf_counter() - start:.0f}s")
    return 0
