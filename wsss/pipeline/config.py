"""The pipeline YAML (``wsss run -c``), typed: one frozen dataclass per section.

Unknown keys anywhere are a ConfigError listing the valid ones, values are checked against the
fields' types, and :meth:`PipelineConfig.to_dict` is the resolved configuration (every default
filled in), as ``wsss run --print-config`` prints it and the manifests record it. The
``classifier`` and ``segmenter`` sections name their stage YAML (``config:``, relative to the
pipeline YAML) and may override any of its keys; those keys are the stages' own and are checked
by the stages' parsers (:func:`wsss.pipeline.steps.check_training_configs`).
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from wsss.errors import ConfigError
from wsss.options import OptionError, check_range, coerce_value, option, option_key, read_yaml, same_option, unknown_keys_error
from wsss.stages.cams import CamOptions
from wsss.stages.eval_cams import EvalCamsOptions
from wsss.stages.predict import PredictOptions
from wsss.stages.pseudo_labels import PseudoLabelOptions
from wsss.stages.refine import RefineOptions
from wsss.systems.predictors import CamVariant

# CAM baselines a run may add (method -> its folder under OUT/cams/).
BASELINES = {"gradcam": "gradcam", "gradcam++": "gradcampp"}


@dataclass(frozen=True)
class CamsConfig(CamOptions):
    """``cams``: LayerCAM at ``layers`` fused, plus the Grad-CAM-family ``baselines`` at stage 5,
    from one pass with :class:`~wsss.stages.cams.CamOptions`. ``fusion`` and ``peak_quantile``
    (:func:`wsss.cams.fuse_cams`) apply to LayerCAM; the baselines keep the standard division by
    their maximum."""

    layers: tuple[str, ...] = same_option(CamVariant, "layers")
    scaled_layers: tuple[str, ...] = same_option(CamVariant, "scaled_layers")
    peak_quantile: float = same_option(CamVariant, "peak_quantile")
    fusion: str = same_option(CamVariant, "fusion")
    baselines: tuple[str, ...] = option(tuple(BASELINES), "Grad-CAM-family baselines at stage 5, each in cams/<name>/")

    def __post_init__(self):
        super().__post_init__()
        self.layercam()  # the variant checks its own values
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise OptionError("baselines", f"{bad} unknown; choose from {', '.join(BASELINES)}")

    def layercam(self) -> CamVariant:
        return CamVariant("layercam", self.layers, self.scaled_layers, True, self.peak_quantile, self.fusion)

    def variants(self) -> dict[str, CamVariant]:
        """CAM folder (under OUT/cams/) -> variant: ``layercam`` and one folder per baseline at stage 5."""
        return {"layercam": self.layercam(), **{BASELINES[m]: CamVariant(m, ("stage5",), (), False) for m in self.baselines}}


EvalCamsConfig = EvalCamsOptions  # ``eval_cams``: the thresholds of the seed sweep


@dataclass(frozen=True)
class PseudoConfig(PseudoLabelOptions):
    """``pseudo``: :class:`~wsss.stages.pseudo_labels.PseudoLabelOptions`, and with
    ``threshold_from_seeds`` each CAM folder's threshold is its best seed threshold of this run's
    eval-cams sweep on ``eval_split`` instead of ``threshold`` (the step checks the band against it)."""

    threshold_from_seeds: bool = option(False, "each CAM folder's threshold is its best one in this run's seed sweep (eval_split)")

    def band_floor(self) -> float:
        return 0.0 if self.threshold_from_seeds else self.threshold


REFINABLE = ("layercam", "gradcam", "gradcampp")  # CAM folders a run can refine


@dataclass(frozen=True)
class RefineConfig(RefineOptions):
    """``refine``: affinity + random-walk refinement (:class:`~wsss.stages.refine.RefineOptions`)
    of the CAM folders ``variants``, between eval-cams and pseudo-labels (off unless ``enabled``);
    the pseudo-labels of a refined folder are made from its refined maps. With
    ``thresholds_from_seeds`` each folder's seed thresholds are ``bg_factor`` and ``fg_factor``
    times its best seed threshold in this run's eval-cams sweep on ``eval_split`` (never ``val``)."""

    enabled: bool = option(False, "refine the CAMs before the pseudo-labels")
    variants: tuple[str, ...] = option(("layercam",), f"CAM folders to refine ({', '.join(REFINABLE)})")
    thresholds_from_seeds: bool = option(False, "seed thresholds from each folder's best seed threshold (x bg_factor, x fg_factor)")
    bg_factor: float = option(0.25, "with thresholds_from_seeds: bg_threshold = this x the best seed threshold")
    fg_factor: float = option(2.0, "with thresholds_from_seeds: fg_threshold = this x the best seed threshold (at most 0.95)")

    def __post_init__(self):
        super().__post_init__()
        bad = [v for v in self.variants if v not in REFINABLE]
        if bad or not self.variants:
            raise OptionError("variants", f"{bad or list(self.variants)} unknown or empty; choose from {', '.join(REFINABLE)}")
        check_range("bg_factor", self.bg_factor, 0, low_open=True)
        check_range("fg_factor", self.fg_factor, 0, low_open=True)
        if self.fg_factor <= self.bg_factor:
            raise OptionError("fg_factor", f"must be above bg_factor ({self.bg_factor:g}), got {self.fg_factor:g}")


@dataclass(frozen=True)
class PredictConfig(PredictOptions):
    """``predict``: the splits the segmenter labels and is scored on (default: val and eval), with
    :class:`~wsss.stages.predict.PredictOptions`; one device (the step runs in the run's process)."""

    splits: tuple[str, ...] | None = option(None, "splits the segmenter predicts and is scored on (none: val_split and eval_split)")
    devices: int | str = option(1, "Lightning devices", neutral=True)

    def __post_init__(self):
        super().__post_init__()
        if self.splits is not None and not self.splits:
            raise OptionError("splits", f"must be a non-empty list of split names, got {list(self.splits)!r}")


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

    data_root: str | None = None  # required: a VOC-layout folder, or "toy" named explicitly
    out: str = "out"
    cam_split: str = "train_aug"
    eval_split: str = "train"
    val_split: str = "val"
    classifier: TrainingSection = field(default_factory=TrainingSection)
    cams: CamsConfig = field(default_factory=CamsConfig)
    eval_cams: EvalCamsConfig = field(default_factory=EvalCamsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
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
    return option_key(f)


# ----------------------------------------------------------------------------- loading


def _section(path: Path, name: str, cls: type, value: Any) -> Any:
    """A section dataclass from its YAML mapping: unknown keys refused with the valid ones."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{name}' must be a mapping, got {value!r}")
    by_key = {_key(f): f for f in fields(cls)}
    unknown = sorted(set(value) - set(by_key))
    if unknown:
        raise unknown_keys_error(f"'{name}'", unknown, by_key)
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{f.name: coerce_value(value[key], hints[f.name], f"{name}.{key}") for key, f in by_key.items() if key in value})
    except OptionError as exc:  # one check, named as the YAML names it
        field_ = next((f for f in fields(cls) if f.name == exc.name), None)
        raise ConfigError(f"{name}.{_key(field_) if field_ else exc.name} {exc.problem}") from None


def _training_section(path: Path, name: str, value: Any) -> TrainingSection:
    if not isinstance(value, dict) or value.get("config") is None:
        raise ConfigError(f"{path}: '{name}.config' must name the stage YAML (e.g. configs/toy/{name}.yaml)")
    stage_yaml = (path.parent / str(value["config"])).resolve()
    if not stage_yaml.is_file():
        raise ConfigError(f"{path}: {name}.config {value['config']} not found (paths are relative to {path.parent})")
    return TrainingSection(stage_yaml, {k: v for k, v in value.items() if k != "config"})


def with_dotted(raw: dict[str, Any], dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``{"cams.fusion": "mean", "segmenter.trainer.max_steps": 100}`` applied: a key
    of one of our sections is set in it; a training section keeps the rest of the key dotted and
    last, so that it wins over the same key nested in the YAML."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in dotted.items():
        section, _, rest = key.partition(".")
        if not rest:
            raw[section] = value
            continue
        if not isinstance(raw.get(section), dict):
            raw[section] = {} if raw.get(section) is None else raw[section]
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--{key}: '{section}' is not a section ({raw[section]!r})")
        raw[section].pop(rest, None)
        raw[section][rest] = value
    return raw


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, dotted: Mapping[str, Any] | None = None) -> PipelineConfig:
    """The pipeline YAML at ``path`` with ``dotted`` keys such as ``cams.fusion`` applied
    (:func:`with_dotted`), then top-level ``overrides`` that are not None (``--data-root``,
    ``--out``); every key checked, defaults filled in."""
    path = Path(path)
    raw = with_dotted(read_yaml(path, "pipeline config"), dotted or {})
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    valid = [f.name for f in fields(PipelineConfig)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{path}: {unknown_keys_error('the pipeline config', unknown, valid)}")
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
                values[name] = coerce_value(raw[name], hints[name], name)
        if values.get("data_root") is None:
            raise ConfigError("data_root is required: a VOC2012 folder (or VOCdevkit, or its parent), or 'toy' for the built-in "
                              "toy dataset (in the YAML, or --data-root)")
        return PipelineConfig(**values)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
