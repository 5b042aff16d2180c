"""Refinement of any CAM folder by affinity and random walk (``wsss refine``), as PSA and IRN refine
their seeds. Three phases, each resumable, into ``OUT/``:

1. ``OUT/seeds/<id>.png``: confident seeds from two thresholds on the CAMs, voted per SLIC
   superpixel (:func:`wsss.pseudo.superpixel_labels`): background where a superpixel's best class
   mean is below ``bg_threshold``, its class where it is at least ``fg_threshold``, 255 between.
2. ``OUT/affinity/last.ckpt``: AffinityNet on the classifier's stage 3-5 features
   (:class:`~wsss.systems.affinity.AffinitySystem`), trained on the pairs within ``radius`` cells
   of the seed crops: same label = affinity 1, different = 0, unknown = no loss.
3. ``OUT/cams/<id>.npz`` (our CAM format: the same classes, maps in [0, 1], so ``eval-cams``,
   ``pseudo-labels``, the report and the IRN/PSA writers read them unchanged) and
   ``OUT/labels/<id>.png`` (argmax over [``label_threshold``, refined maps], IRN's rule): each
   image's maps random-walked along its affinities (:func:`wsss.affinity.random_walk`).

Each folder records what made it (:mod:`wsss.records`). Plumbing only: the math is
:mod:`wsss.affinity`, the model :mod:`wsss.models.affinity`.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from wsss import limit_onednn_cache
from wsss.affinity import neighbour_offsets, random_walk_bytes
from wsss.data import open_layout
from wsss.data.datasets import SegmentationDataset, collate_list
from wsss.data.modules import PredictDataModule
from wsss.data.transforms import eval_transform, to_tv, train_transform
from wsss.data.voc import DatasetLayout
from wsss.errors import ConfigError, DataError, name_some
from wsss.formats.cams import cam_files_in, find_cam_files, is_complete, read_cams, write_cams
from wsss.formats.images import image_size, read_image
from wsss.formats.label_png import PNG_MODE_HELP, PNG_MODES, label_pngs_in, missing_label_pngs, read_label_png, write_label_png
from wsss.formats.torch_files import read_checkpoint
from wsss.options import (OptionError, add_options, check_choices, check_range, option, options_from_args, parse_stage_args,
                          resource_values, result_params)
from wsss.pseudo import cam_seed_labels
from wsss.records import claim_folder, file_digest, folder_identity, read_record
from wsss.stages.pseudo_labels import PseudoLabelOptions, make_pseudo_labels
from wsss.systems.affinity import AffinitySystem, RefinePredictor
from wsss.systems.checkpoints import SafeCheckpointIO, load_classifier
from wsss.systems.writers import PerImageWriter
from wsss.trainers import default_precision, gather_objects, is_global_zero, parse_devices, predict_trainer

log = logging.getLogger(__name__)
MIB = 2**20


@dataclass(frozen=True)
class RefineOptions:
    """Seeds, affinity training and random walk. Defaults: PSA's radius 5 at stride 8, beta 8 and
    2^8 = 256 steps (PSA's logt 8; IRN: beta 10, the same 256), IRN's background score 0.25 for
    the label PNGs; the seed thresholds are IRN's 0.05 / 0.30 unless a run chooses them from its
    train sweep. Checked here."""

    bg_threshold: float = option(0.05, "seeds: background where a superpixel's best CAM mean is below this")
    fg_threshold: float = option(0.30, "seeds: the class where a superpixel's best CAM mean is at least this (255 in between)")
    n_segments: int = option(600, "SLIC superpixels of the seeds (docs/slic_sweep.md: VOC-size photos)")
    kind: str = option("embedding", "affinity from an embedding's L1 distances (embedding, PSA) or from the boundaries on the path "
                       "between two cells (boundary, IRN)", choices=("embedding", "boundary"))
    stride: int = option(8, "affinity grid: one cell per 4 or 8 pixels (PSA: 8, IRN: 4)")
    radius: int = option(5, "pairs within this many cells (dy^2 + dx^2 < r^2) are trained and walked (PSA, IRN: 5)")
    embedding: int = option(448, "AffinityNet embedding channels (PSA: 448)")
    crop_size: int = option(256, "training crop side")
    scale_range: tuple[float, ...] = option((0.7, 1.3), "training rescale range")
    batch_size: int = option(8, "training crops per step (PSA: 8)")
    max_steps: int = option(400, "training steps (400 x 8 crops: 6 passes over 528 photos)")
    lr: float = option(0.1, "SGD learning rate of the heads (poly schedule; a trainable trunk at a tenth of it)")
    frozen_trunk: bool = option(True, "keep the classifier's trunk frozen (the CPU preset; its features are the CAMs')")
    beta: float = option(8.0, "random walk: transition weights affinity^beta (PSA: 8, IRN: 10)")
    iterations: int = option(256, "random walk steps (PSA/IRN: 2^8 = 256)")
    label_threshold: float = option(0.25, "label PNGs: background where every refined map is at most this (IRN: 0.25)")
    png_mode: str = option("palette", PNG_MODE_HELP, choices=PNG_MODES)
    precision: str | None = option(None, "Trainer precision of training and refinement (none: bf16 where the hardware has it)")
    max_memory_mb: int = option(8192, "refuse before any work when one image's random walk would need more than this", neutral=True)
    num_workers: int = option(2, "DataLoader worker processes", neutral=True)
    accelerator: str = option("auto", "Lightning accelerator", neutral=True)
    devices: int | str = option(1, "Lightning devices", neutral=True, parse=parse_devices)

    def __post_init__(self):
        check_choices(self)
        check_range("bg_threshold", self.bg_threshold, 0, 1)
        check_range("fg_threshold", self.fg_threshold, 0, 1)
        if self.fg_threshold <= self.bg_threshold:
            raise OptionError("fg_threshold", f"must be above bg_threshold ({self.bg_threshold:g}), got {self.fg_threshold:g}")
        check_range("n_segments", self.n_segments, 1)
        if self.stride not in (4, 8):
            raise OptionError("stride", f"must be 4 or 8, got {self.stride!r}")
        check_range("radius", self.radius, 2)
        for name in ("embedding", "crop_size", "batch_size", "max_steps", "iterations"):
            check_range(name, getattr(self, name), 1)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("beta", self.beta, 0, low_open=True)
        check_range("label_threshold", self.label_threshold, 0, 1)
        check_range("max_memory_mb", self.max_memory_mb, 1)
        check_range("num_workers", self.num_workers, 0)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise OptionError("scale_range", f"must be two positive numbers low <= high, got {list(self.scale_range)}")

    def resolved_precision(self) -> str:
        return self.precision or default_precision(self.accelerator)


@dataclass
class RefineSummary:
    """What a refinement did: images, seeds without any confident foreground, steps trained,
    refined files written / kept, the random walk's memory at the largest image, seconds per phase."""

    images: int = 0
    no_foreground: list[str] = field(default_factory=list)
    trained_steps: int = 0
    written: int = 0
    skipped: int = 0
    walk_mib: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        times = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        return (f"{self.images} images ({len(self.no_foreground)} without confident foreground: background/ignore seeds); "
                f"affinity net {self.trained_steps} steps; {self.written} refined, {self.skipped} already done; "
                f"random walk {self.walk_mib:.0f} MiB at the largest image; {times}")


class RefineDataset(Dataset):
    """Full-size images with their CAMs: ``{"id", "image" (3, H, W), "cams" (K, H, W) float32, "classes"}``."""

    def __init__(self, layout: DatasetLayout, ids: list[str], cam_files: dict[str, Path]):
        self.layout, self.ids, self.cam_files, self.transform = layout, ids, cam_files, eval_transform()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = read_image(self.layout.image_path(image_id))
        cams, classes = read_cams(self.cam_files[image_id], image_size=image.shape[:2], num_classes=self.layout.num_classes)
        if cams.shape[1:] != image.shape[:2]:
            raise DataError(f"{self.cam_files[image_id]}: maps are {cams.shape[1:]} but the image is {image.shape[:2]}")
        return {"id": image_id, "image": self.transform(*to_tv(image)), "cams": torch.from_numpy(cams.astype(np.float32)),
                "classes": classes.tolist()}


class RefineWriter(PerImageWriter):
    """Refined maps -> ``cams/<id>.npz`` (float16, as ``wsss cams`` writes) and ``labels/<id>.png``."""

    def __init__(self, cam_dir: Path, label_dir: Path, label_threshold: float, png_mode: str):
        super().__init__(cam_dir)
        self.label_dir, self.label_threshold, self.png_mode = label_dir, label_threshold, png_mode

    def write_item(self, item: dict[str, Any]) -> None:
        classes = np.asarray(item["classes"], dtype=np.int64)
        cams = item["cams"].astype(np.float16)
        write_cams(self.out_dir / f"{item['id']}.npz", classes=classes, cams=cams)
        write_label_png(self.label_dir / f"{item['id']}.png", cam_seed_labels(cams.astype(np.float32), classes, self.label_threshold),
                        self.png_mode)
        self.written += 1


def check_walk_memory(layout: DatasetLayout, ids: list[str], options: RefineOptions) -> float:
    """MiB of one image's random walk at the largest image of ``ids``; ConfigError before any work
    when that exceeds ``max_memory_mb``, naming the size it would need."""
    height, width = max((image_size(layout.image_path(i)) for i in ids), key=lambda hw: hw[0] * hw[1])
    grid = (-(-height // options.stride), -(-width // options.stride))
    needed = random_walk_bytes(grid, len(neighbour_offsets(options.radius)), 20, options.embedding) / MIB
    if needed > options.max_memory_mb:
        raise ConfigError(f"the random walk of a {width}x{height} image at stride {options.stride}, radius {options.radius} needs "
                          f"{needed:.0f} MiB, above max_memory_mb {options.max_memory_mb}: raise it or use a smaller radius / stride 8")
    return needed


def check_classifier(cam_dir: Path, classifier_identity: str) -> None:
    """ConfigError when ``cam_dir`` records that another classifier made it (folders without a
    record, such as IRN's, cannot be checked)."""
    record = read_record(cam_dir)
    made_by = ((record or {}).get("inputs") or {}).get("classifier")
    if made_by is not None and made_by != classifier_identity:
        raise ConfigError(f"{cam_dir} was made by another classifier ({made_by[:19]}...) than the one given ({classifier_identity[:19]}...): "
                          "the affinities would come from other features than the CAMs; pass the classifier that made them")
    if record is None:
        log.warning("%s has no record of the classifier that made it; refining it with the one given", cam_dir)


def train_affinity(system: AffinitySystem, layout: DatasetLayout, ids: list[str], seed_dir: Path, ckpt_dir: Path,
                   options: RefineOptions, progress: bool) -> int:
    """Fit ``system`` on seed crops (resuming from ``ckpt_dir/last.ckpt``); returns the steps trained."""
    dataset = SegmentationDataset(layout, ids, seed_dir, train_transform(options.crop_size, tuple(options.scale_range), True, 0.0))
    loader = DataLoader(dataset, batch_size=min(options.batch_size, len(ids)), shuffle=True, drop_last=True,
                        num_workers=options.num_workers, persistent_workers=options.num_workers > 0)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=50,
                                              enable_version_counter=False)
    trainer = pl.Trainer(max_steps=options.max_steps, max_epochs=-1, accelerator=options.accelerator, devices=options.devices,
                         precision=options.resolved_precision(), logger=pl.loggers.CSVLogger(ckpt_dir, name="logs"),
                         callbacks=[checkpoint], plugins=[SafeCheckpointIO()], enable_progress_bar=progress, enable_model_summary=False,
                         log_every_n_steps=10, limit_val_batches=0, num_sanity_val_steps=0)
    last = ckpt_dir / "last.ckpt"
    with warnings.catch_warnings():  # the frozen trunk is in eval mode on purpose (its BatchNorm statistics stay)
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training")
        trainer.fit(system, train_dataloaders=loader, ckpt_path=str(last) if last.is_file() else None)
    return int(trainer.global_step)


def make_refined_cams(
    checkpoint: str | Path,
    data_root: str | Path,
    cam_dir: str | Path,
    out_dir: str | Path,
    options: RefineOptions = RefineOptions(),
    *,
    split: str = "train_aug",
    overwrite: bool = False,
    progress: bool = True,
) -> RefineSummary:
    """Refine the CAMs of ``split`` in ``cam_dir`` (our ``.npz``, IRN's or PSA's ``.npy``) with an
    affinity net on ``checkpoint``'s features (module docstring); every check before any work."""
    limit_onednn_cache()
    start = time.perf_counter()
    cam_dir, out = Path(cam_dir), Path(out_dir)
    layout = open_layout(data_root)
    ids = layout.read_ids(split)
    layout.check_images(ids)
    cam_files, missing = find_cam_files(cam_dir, ids)
    if missing:
        raise DataError(f"{len(missing)} of {len(ids)} listed ids have no CAM file in {cam_dir}: {name_some(missing)}")
    classifier_identity = f"sha256:{file_digest(checkpoint)}"
    check_classifier(cam_dir, classifier_identity)
    summary = RefineSummary(images=len(ids), walk_mib=check_walk_memory(layout, ids, options))
    params = result_params(options)
    inputs = {"classifier": classifier_identity, "cams": folder_identity(cam_dir)}
    resources = resource_values(options)
    sources = {"checkpoint": Path(checkpoint).resolve(), "cams": cam_dir.resolve(), "data_root": layout.root}
    seed_dir, ckpt_dir, refined_dir, label_dir = out / "seeds", out / "affinity", out / "cams", out / "labels"
    checkpoints = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / "finished.ckpt") if p.is_file()]
    for folder, stage, existing, what in ((ckpt_dir, "refine-affinity", checkpoints, "affinity checkpoints"),
                                          (refined_dir, "refine", cam_files_in(refined_dir), "refined CAM files"),
                                          (label_dir, "refine-labels", label_pngs_in(label_dir), "label PNGs")):
        claim_folder(folder, stage, params, inputs, overwrite=overwrite, existing=existing, what=what, writer=is_global_zero(),
                     resources=resources, sources=sources)

    # 1. seeds: eq. 10's superpixel vote with an uncertain band, which is what the seeds are.
    phase = time.perf_counter()
    seed_options = PseudoLabelOptions(threshold=options.bg_threshold, ignore_below=options.fg_threshold, n_segments=options.n_segments,
                                      workers=max(1, options.num_workers))
    make_pseudo_labels(layout.root, cam_dir, seed_dir, split=split, options=seed_options, overwrite=overwrite,
                       progress=progress).raise_for_failures()
    summary.no_foreground = [i for i in ids if not (read_label_png(seed_dir / f"{i}.png", labels=layout.labels) % 255).any()]
    summary.seconds["seeds"] = time.perf_counter() - phase

    # 2. the affinity net on the classifier's trunk.
    phase = time.perf_counter()
    trunk = load_classifier(checkpoint).features  # a fresh model: nothing else holds it
    hparams = dict(stride=options.stride, radius=options.radius, embedding=options.embedding, frozen_trunk=options.frozen_trunk, lr=options.lr,
                   kind=options.kind)
    system = AffinitySystem(trunk, **hparams)
    finished = ckpt_dir / "finished.ckpt"
    if finished.is_file():
        saved = read_checkpoint(finished)
        system.load_state_dict(saved["state_dict"])
        summary.trained_steps = int(saved.get("global_step", options.max_steps))
    else:
        summary.trained_steps = train_affinity(system, layout, ids, seed_dir, ckpt_dir, options, progress)
        if is_global_zero():
            torch.save({"state_dict": system.state_dict(), "global_step": summary.trained_steps, "hyper_parameters": hparams}, finished)
    summary.seconds["affinity"] = time.perf_counter() - phase

    # 3. the random walk of every image's maps.
    phase = time.perf_counter()
    unlabelled = set(missing_label_pngs(label_dir, ids, options.png_mode))  # one set, not a search per id
    todo = ids if overwrite else [i for i in ids if i in unlabelled or not is_complete(refined_dir / f"{i}.npz")]
    summary.skipped = len(ids) - len(todo)
    if todo:
        predictor = RefinePredictor(system.model, options.radius, options.beta, options.iterations, options.kind)
        writer = RefineWriter(refined_dir, label_dir, options.label_threshold, options.png_mode)
        data = PredictDataModule(RefineDataset(layout, todo, cam_files), 1, options.num_workers, collate_list)
        trainer = predict_trainer(writer, options.accelerator, options.devices, progress=progress, precision=options.resolved_precision())
        trainer.predict(predictor, datamodule=data, return_predictions=False)
        summary.written = sum(gather_objects(trainer, writer.written))
    summary.seconds["random walk"] = time.perf_counter() - phase
    summary.seconds["total"] = time.perf_counter() - start
    return summary


def main(argv: list[str]) -> int:
    """``wsss refine``: see ``--help``."""
    parser = argparse.ArgumentParser(prog="wsss refine", description="Refine a CAM folder by affinity + random walk (PSA/IRN): "
                                     "seeds from two thresholds, an affinity net on the classifier's features, every map random-walked. "
                                     "Writes OUT/seeds, OUT/affinity, OUT/cams (our CAM format) and OUT/labels.")
    parser.add_argument("--checkpoint", required=True, help="the classifier checkpoint (`wsss train-cls`) that made the CAMs")
    parser.add_argument("--cams", required=True, type=Path, help="folder of CAM files: ours (<id>.npz) or IRN's / PSA's (<id>.npy)")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--split", default="train_aug", help="split name or list file (default: train_aug)")
    add_options(parser, RefineOptions)
    parser.add_argument("--overwrite", action="store_true", help="redo everything (and replace a folder made with other settings)")
    args = parse_stage_args(parser, argv, RefineOptions)
    summary = make_refined_cams(args.checkpoint, args.data_root, args.cams, args.out, options_from_args(RefineOptions, args),
                                split=args.split, overwrite=args.overwrite)
    if is_global_zero():
        print(f"refine -> {args.out}: {summary.line()}")
        if summary.no_foreground:
            print(f"images without confident foreground: {name_some(summary.no_foreground)}")
    return 0


def summary_dict(summary: RefineSummary) -> dict[str, Any]:
    return {**asdict(summary), "no_foreground": len(summary.no_foreground)}
