"""The pipeline YAML (``wsss run -c``), typed: one frozen dataclass per section.

Unknown keys anywhere are a ConfigError listing the valid ones, values are checked against the
fields' types, and :meth:`PipelineConfig.to_dict` is the resolved configuration (every default
filled in), as ``wsss run --print-config`` prints it and the manifests record it. The
``classifier`` and ``segmenter`` sections name their stage YAML (``config:``, relative to the
pipeline YAML) and may override any of its keys; those keys are the stages' own and are checked
by the stages' parsers (:func:`wsss.pipeline.steps.check_training_configs`).
"""
from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from wsss.errors import ConfigError

# CAM baselines a run may add (method -> its folder under OUT/cams/).
BASELINES = {"gradcam": "gradcam", "gradcam++": "gradcampp"}


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``); ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def _positive_numbers(name: str, values: tuple[float, ...]) -> None:
    if not values or not all(value > 0 for value in values):
        raise ConfigError(f"{name} must be a list of positive numbers, got {list(values)!r}")


@dataclass(frozen=True)
class CamsConfig:
    """``cams``: LayerCAM at ``layers`` fused, plus the Grad-CAM-family ``baselines`` at stage 5.
    ``fusion`` and ``peak_quantile`` (:func:`wsss.cams.fuse_cams`) apply to LayerCAM; the baselines
    keep the standard division by their maximum."""

    layers: tuple[str, ...] = ("stage3", "stage4", "stage5")
    scaled_layers: tuple[str, ...] = field(default=("stage3",), metadata={"key": "scaled"})
    gamma: float = 2.0
    fusion: str = "max"
    peak_quantile: float = 1.0
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    view_weighting: str = "area"
    channels_last: bool = False
    baselines: tuple[str, ...] = ("gradcam", "gradcam++")
    labels: str = "auto"
    batch_size: int = 1
    num_workers: int = 2
    accelerator: str = "auto"
    devices: int | str = 1

    def __post_init__(self):
        if not self.layers:
            raise ConfigError("cams.layers must not be empty")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"cams.baselines {bad} unknown; choose from {sorted(BASELINES)}")
        _positive_numbers("cams.scales", self.scales)
        from wsss.cams import FUSIONS, VIEW_WEIGHTINGS

        if self.fusion not in FUSIONS:
            raise ConfigError(f"cams.fusion {self.fusion!r} unknown; choose from {', '.join(FUSIONS)}")
        if not 0 < self.peak_quantile <= 1:
            raise ConfigError(f"cams.peak_quantile must be in (0, 1], got {self.peak_quantile!r}")
        if self.view_weighting not in VIEW_WEIGHTINGS:
            raise ConfigError(f"cams.view_weighting {self.view_weighting!r} unknown; choose from {', '.join(VIEW_WEIGHTINGS)}")


@dataclass(frozen=True)
class EvalCamsConfig:
    """``eval_cams``: the background thresholds of the seed sweep (``START:STOP:STEP`` or ``a,b``)."""

    thresholds: str = "0.05:0.95:0.05"
    workers: int = 1


@dataclass(frozen=True)
class PseudoConfig:
    """``pseudo``: eq. 10's background threshold (or, with ``threshold_from_seeds``, each CAM
    folder's best seed threshold of this run's eval-cams sweep on ``eval_split``), the optional
    uncertain band up to ``ignore_below`` (left at 255), the dense-CRF refinement ``crf``, SLIC
    overrides (None = the stage's default), and the PNGs' ``png_mode`` (``palette`` or ``gray``)."""

    threshold: float = 0.3
    threshold_from_seeds: bool = False
    ignore_below: float | None = None
    crf: bool = False
    n_segments: int | None = None
    compactness: float | None = None
    sigma: float | None = None
    workers: int = 1
    png_mode: str = "palette"

    def __post_init__(self):
        from wsss.formats.label_png import check_png_mode

        check_png_mode(self.png_mode, "pseudo.png_mode")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"pseudo.threshold must be a finite number, got {self.threshold!r}")
        # With threshold_from_seeds the constant threshold is replaced per CAM folder; the step
        # checks the band against each folder's own threshold.
        floor = 0.0 if self.threshold_from_seeds else self.threshold
        if self.ignore_below is not None and not (math.isfinite(self.ignore_below) and self.ignore_below > floor):
            bound = "0 (the thresholds come from the seeds)" if self.threshold_from_seeds else f"pseudo.threshold ({self.threshold})"
            raise ConfigError(f"pseudo.ignore_below must be a number above {bound}, got {self.ignore_below!r}")
        if self.crf and self.ignore_below is not None:
            raise ConfigError("pseudo.crf and pseudo.ignore_below cannot be combined (the band is on the constant threshold the CRF replaces)")

    def slic(self) -> dict[str, Any]:
        """The SLIC options given (the others keep SLIC_DEFAULTS)."""
        return {k: v for k, v in (("n_segments", self.n_segments), ("compactness", self.compactness), ("sigma", self.sigma)) if v is not None}


@dataclass(frozen=True)
class PredictConfig:
    """``predict``: the splits the segmenter labels and is scored on (default: val and eval), its
    test-time views and the PNGs' ``png_mode`` (``palette`` or ``gray``)."""

    splits: tuple[str, ...] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    batch_size: int = 1
    num_workers: int = 2
    accelerator: str = "auto"
    png_mode: str = "palette"

    def __post_init__(self):
        from wsss.formats.label_png import check_png_mode

        check_png_mode(self.png_mode, "predict.png_mode")
        if self.splits is not None and not self.splits:
            raise ConfigError(f"predict.splits must be a non-empty list of split names, got {list(self.splits)!r}")
        _positive_numbers("predict.scales", self.scales)


@dataclass(frozen=True)
class TrainingSection:
    """``classifier`` / ``segmenter``: the stage YAML and overrides of any of its keys (nested
    mappings, or dotted keys such as ``data.batch_size``)."""

    config: Path | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": None if self.config is None else str(self.config), **self.overrides}


@dataclass(frozen=True)
class PipelineConfig:
    """A whole ``wsss run`` configuration. ``cam_split``: CAMs, pseudo-labels and the segmenter's
    training set; ``eval_split``: seed and pseudo-label mIoU; ``val_split``: validation of both
    trained stages."""

    data_root: str = "toy"
    out: str = "out"
    cam_split: str = "train_aug"
    eval_split: str = "train"
    val_split: str = "val"
    classifier: TrainingSection = field(default_factory=TrainingSection)
    cams: CamsConfig = field(default_factory=CamsConfig)
    eval_cams: EvalCamsConfig = field(default_factory=EvalCamsConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    segmenter: TrainingSection = field(default_factory=TrainingSection)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration with the YAML's key names (loads again with :func:`load_config`)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    """A config value as YAML/JSON data: sections as mappings under their YAML keys, tuples as lists."""
    if isinstance(value, TrainingSection):
        return value.to_dict()
    if is_dataclass(value):
        return {_key(f): _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _key(f) -> str:
    return f.metadata.get("key", f.name)


# ----------------------------------------------------------------------------- loading


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` of a field (lists become tuples); ConfigError naming ``where``."""
    if isinstance(hint, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"'{where}' must be {' or '.join(_type_name(o) for o in typing.get_args(hint))}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, list):
            return tuple(_coerce(v, item, f"{where}[{n}]") for n, v in enumerate(value))
        raise ConfigError(f"'{where}' must be a list, got {value!r}")
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"'{where}' must be {_type_name(hint)}, got {value!r}")


def _section(path: Path, name: str, cls: type, value: Any) -> Any:
    """A section dataclass from its YAML mapping: unknown keys refused with the valid ones."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{name}' must be a mapping, got {value!r}")
    by_key = {_key(f): f for f in fields(cls)}
    unknown = sorted(set(value) - set(by_key))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in '{name}'; valid keys: {sorted(by_key)}")
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _coerce(value[key], hints[f.name], f"{name}.{key}") for key, f in by_key.items() if key in value})


def _training_section(path: Path, name: str, value: Any) -> TrainingSection:
    if not isinstance(value, dict) or value.get("config") is None:
        raise ConfigError(f"{path}: '{name}.config' must name the stage YAML (e.g. configs/toy/{name}.yaml)")
    stage_yaml = (path.parent / str(value["config"])).resolve()
    if not stage_yaml.is_file():
        raise ConfigError(f"{path}: {name}.config {value['config']} not found (paths are relative to {path.parent})")
    return TrainingSection(stage_yaml, {k: v for k, v in value.items() if k != "config"})


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """The pipeline YAML at ``path`` (top-level ``overrides`` that are not None win, e.g. ``--out``),
    every key checked, defaults filled in."""
    path = Path(path)
    raw = read_yaml(path, "pipeline config")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    valid = [f.name for f in fields(PipelineConfig)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    hints = typing.get_type_hints(PipelineConfig)
    values: dict[str, Any] = {}
    try:
        for name in valid:
            if hints[name] is TrainingSection:
                values[name] = _training_section(path, name, raw.get(name))
            elif is_dataclass(hints[name]):
                values[name] = _section(path, name, hints[name], raw.get(name))
            elif name in raw:
                if raw[name] is None or isinstance(raw[name], (dict, list)):
                    raise ConfigError(f"'{name}' must be a single value, got {raw[name]!r}")
                values[name] = _coerce(raw[name], hints[name], name)
        return PipelineConfig(**values)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
