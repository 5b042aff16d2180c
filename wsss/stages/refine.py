"""Refinement of any CAM folder by affinity and random walk (``wsss refine``), IRN's method
(``--kind boundary``) or PSA's (``--kind embedding``) as their code does it. Three phases, each
resumable, into ``OUT/``:

1. ``OUT/seeds/<id>.png``: confident seeds from two dense CRFs by the kind's rule
   (:func:`wsss.seeds.crf_seeds`), or from a superpixel vote at two thresholds
   (:func:`wsss.pseudo.superpixel_labels`): 0 background, a class, 255 unknown.
2. ``OUT/affinity/finished.ckpt``: IRN's BoundaryNet or PSA's AffinityNet on the classifier's
   features (:class:`~wsss.systems.affinity.AffinitySystem`), trained on the seed pairs within
   ``train_radius`` cells of random crops: same label = affinity 1, different = 0, unknown = no loss.
3. ``OUT/cams/<id>.npz`` (our CAM format: the same classes, maps in [0, 1], so ``eval-cams``,
   ``pseudo-labels``, the report and the IRN/PSA writers read them unchanged) and
   ``OUT/labels/<id>.png`` (the kind's label rule): each image's maps random-walked along its
   affinities (:class:`~wsss.systems.affinity.RefinePredictor`).

Each folder records what made it (:mod:`wsss.records`). Plumbing only: the math is
:mod:`wsss.affinity` and :mod:`wsss.seeds`, the models :mod:`wsss.models.affinity`.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from functools import partial
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from wsss import limit_onednn_cache
from wsss.affinity import NORMALISATIONS, neighbour_offsets, path_points, random_walk_bytes
from wsss.crf import CRF_INSTALL_HINT, crf_available
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
from wsss.io import atomic_path
from wsss.models.affinity import BoundaryNet
from wsss.parallel import balanced_chunk_size, chunked, parallel_imap
from wsss.records import claim_folder, file_digest, folder_identity, read_record
from wsss.stages.pseudo_labels import PseudoLabelOptions, make_pseudo_labels
from wsss.systems.affinity import AffinitySystem, RefinePredictor
from wsss.systems.checkpoints import SafeCheckpointIO, load_classifier
from wsss.seeds import crf_seeds
from wsss.systems.writers import PerImageWriter
from wsss.trainers import default_precision, gather_objects, is_global_zero, parse_devices, predict_trainer

log = logging.getLogger(__name__)
MIB = 2**20


# The two references' published values, where they differ (IRN: run_sample.py, step/train_irn.py;
# PSA: train_aff.py, infer_aff.py, voc12/data.py). An option left unset takes its kind's value.
# Momentum: both build SGD(params, lr, weight_decay), so their momentum is the weight decay's value.
REFERENCE = {
    "boundary": {"stride": 4, "train_radius": 10, "beta": 10.0, "weight_decay": 1e-4, "momentum": 1e-4, "scale_range": (0.5, 1.5)},
    "embedding": {"stride": 8, "train_radius": 5, "beta": 8.0, "weight_decay": 5e-4, "momentum": 5e-4, "scale_range": (0.9, 1.5)},
}
SEED_METHODS = ("crf", "superpixel")


@dataclass(frozen=True)
class RefineOptions:
    """Seeds, affinity training and random walk. ``kind`` picks the method, IRN's (``boundary``) or
    PSA's (``embedding``); the options left unset (none) take that reference's value (REFERENCE),
    the others are both references' (radius 5 walked, 2^8 = 256 steps, IRN's seed thresholds
    0.05 / 0.30 and background score 0.25). Checked here."""

    kind: str = option("boundary", "affinity from the boundaries on the path between two cells (boundary: IRN) or from an "
                       "embedding's L1 distances (embedding: PSA)", choices=("boundary", "embedding"))
    seeds: str = option("crf", "seeds from two dense CRFs as the kind's reference makes them (crf: IRN's label CRFs at the two "
                        "thresholds, PSA's score CRFs at background powers 4 and 32) or from a superpixel vote at the two "
                        "thresholds (superpixel)", choices=SEED_METHODS)
    bg_threshold: float = option(0.05, "seeds: background where every CAM is at most this (IRN: 0.05; superpixel: the best class mean)")
    fg_threshold: float = option(0.30, "seeds: a class where its CAM is above this (IRN: 0.30; 255 in between)")
    n_segments: int = option(600, "SLIC superpixels of --seeds superpixel (docs/slic_sweep.md: VOC-size photos)")
    stride: int | None = option(None, "affinity grid: one cell per 4 or 8 pixels (none: the kind's, IRN 4 (its only one), PSA 8)")
    radius: int = option(5, "the walk's pairs: within this many cells (dy^2 + dx^2 < r^2; PSA, IRN: 5)")
    train_radius: int | None = option(None, "training pairs within this many cells (none: the kind's, IRN 10, PSA 5)")
    embedding: int = option(448, "AffinityNet embedding channels (PSA: 448)")
    crop_size: int = option(256, "training crop side (IRN: 512, PSA: 448)")
    scale_range: tuple[float, ...] | None = option(None, "training rescale range (none: the kind's, IRN 0.5,1.5; PSA's long side "
                                                   "448-768 is about 0.9,1.5 of a VOC photo)")
    batch_size: int = option(8, "training crops per step (PSA: 8, IRN: 32)")
    max_steps: int = option(400, "training steps (400 x 8 crops: 6 passes over 528 photos; IRN: 3 passes over train_aug)")
    lr: float = option(0.1, "SGD learning rate of the heads (IRN, PSA: 0.1; poly schedule; a trainable trunk at a tenth of it)")
    momentum: float | None = option(None, "SGD momentum (none: the kind's, IRN 1e-4, PSA 5e-4: their weight decay in momentum's "
                                    "place)")
    weight_decay: float | None = option(None, "SGD weight decay (none: the kind's, IRN 1e-4, PSA 5e-4)")
    frozen_trunk: bool = option(True, "keep the classifier's trunk frozen (IRN freezes its backbone)")
    flip: bool = option(True, "boundary: average the boundary map with the mirror image's (IRN)")
    edge_product: bool = option(True, "boundary: multiply the maps by 1 - boundary before the walk (IRN); off walks them as they are, "
                                "for a net whose boundary map is not near 0 inside objects (README 'Refinement')")
    beta: float | None = option(None, "random walk: transition weights affinity^beta (none: the kind's, IRN 10, PSA 8)")
    iterations: int = option(256, "random walk steps (PSA, IRN: 2^8 = 256)")
    normalisation: str = option("global", "after the walk, divide every class by the one maximum over all (global: IRN) or each by "
                                "its own (per_class)", choices=NORMALISATIONS)
    bg_power: float = option(16.0, "embedding: the walked background map is (1 - max CAM)^this (PSA's alpha: 16)")
    label_threshold: float = option(0.25, "boundary: label PNGs are background where every refined map is at most this (IRN: 0.25); "
                                    "embedding labels by the walked background instead, as PSA")
    png_mode: str = option("palette", PNG_MODE_HELP, choices=PNG_MODES)
    precision: str | None = option(None, "Trainer precision of training and refinement (none: bf16 where the hardware has it)")
    max_memory_mb: int = option(8192, "refuse before any work when one image's random walk would need more than this", neutral=True)
    num_workers: int = option(2, "DataLoader worker processes (and seed processes)", neutral=True)
    accelerator: str = option("auto", "Lightning accelerator", neutral=True)
    devices: int | str = option(1, "Lightning devices", neutral=True, parse=parse_devices)

    def __post_init__(self):
        check_choices(self)
        for name, value in REFERENCE[self.kind].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        check_range("bg_threshold", self.bg_threshold, 0, 1)
        check_range("fg_threshold", self.fg_threshold, 0, 1)
        if self.fg_threshold <= self.bg_threshold:
            raise OptionError("fg_threshold", f"must be above bg_threshold ({self.bg_threshold:g}), got {self.fg_threshold:g}")
        check_range("n_segments", self.n_segments, 1)
        if self.stride not in (4, 8):
            raise OptionError("stride", f"must be 4 or 8, got {self.stride!r}")
        if self.kind == "boundary" and self.stride != BoundaryNet.stride:
            raise OptionError("stride", f"must be {BoundaryNet.stride} for the boundary kind (IRN's boundary map), got {self.stride}")
        check_range("radius", self.radius, 2)
        check_range("train_radius", self.train_radius, 2)
        for name in ("embedding", "crop_size", "batch_size", "max_steps", "iterations"):
            check_range(name, getattr(self, name), 1)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("momentum", self.momentum, 0, 1, high_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("beta", self.beta, 0, low_open=True)
        check_range("bg_power", self.bg_power, 0, low_open=True)
        check_range("label_threshold", self.label_threshold, 0, 1)
        check_range("max_memory_mb", self.max_memory_mb, 1)
        check_range("num_workers", self.num_workers, 0)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise OptionError("scale_range", f"must be two positive numbers low <= high, got {list(self.scale_range)}")

    def resolved_precision(self) -> str:
        return self.precision or default_precision(self.accelerator)

    def seed_rule(self) -> str:
        """The CRF seed rule of the kind's reference."""
        return "irn" if self.kind == "boundary" else "psa"


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
    """Refined maps -> ``cams/<id>.npz`` (float16, as ``wsss cams`` writes) and their labels -> ``labels/<id>.png``."""

    def __init__(self, cam_dir: Path, label_dir: Path, png_mode: str):
        super().__init__(cam_dir)
        self.label_dir, self.png_mode = label_dir, png_mode

    def write_item(self, item: dict[str, Any]) -> None:
        write_cams(self.out_dir / f"{item['id']}.npz", classes=np.asarray(item["classes"], dtype=np.int64), cams=item["cams"].astype(np.float16))
        write_label_png(self.label_dir / f"{item['id']}.png", item["labels"], self.png_mode)
        self.written += 1


def check_walk_memory(layout: DatasetLayout, ids: list[str], options: RefineOptions) -> float:
    """MiB of one image's random walk at the largest image of ``ids`` with every class of the
    label set present (and PSA's background map); ConfigError before any work when that exceeds
    ``max_memory_mb``, naming the size it would need."""
    height, width = max((image_size(layout.image_path(i)) for i in ids), key=lambda hw: hw[0] * hw[1])
    grid = (-(-height // options.stride), -(-width // options.stride))
    offsets = neighbour_offsets(options.radius)
    if options.kind == "boundary":  # the boundary map and its shifted copies, one per path cell
        features, maps = 1 + len({cell for offset in offsets for cell in path_points(offset)}), layout.num_classes
    else:
        features, maps = options.embedding, layout.num_classes + 1
    needed = random_walk_bytes(grid, len(offsets), maps, features) / MIB
    if needed > options.max_memory_mb:
        raise ConfigError(f"the random walk of a {width}x{height} image at stride {options.stride}, radius {options.radius} needs "
                          f"{needed:.0f} MiB, above max_memory_mb {options.max_memory_mb}: raise it or use a smaller radius / stride 8")
    return needed


def seed_chunk(chunk: list[str], *, layout: DatasetLayout, cam_files: dict[str, Path], seed_dir: Path, options: RefineOptions) -> int:
    """CRF seeds (:func:`wsss.seeds.crf_seeds`) of the ids of ``chunk`` -> ``seed_dir/<id>.png``."""
    for image_id in chunk:
        image = read_image(layout.image_path(image_id))
        cams, classes = read_cams(cam_files[image_id], image_size=image.shape[:2], num_classes=layout.num_classes)
        seeds = crf_seeds(image, cams.astype(np.float32), classes, options.seed_rule(), options.bg_threshold, options.fg_threshold)
        write_label_png(seed_dir / f"{image_id}.png", seeds)
    return len(chunk)


def make_crf_seeds(layout: DatasetLayout, ids: list[str], cam_files: dict[str, Path], seed_dir: Path, options: RefineOptions, *,
                   overwrite: bool, progress: bool) -> None:
    """The seeds of every id missing from ``seed_dir`` (all with ``overwrite``), in ``num_workers`` processes."""
    from tqdm import tqdm

    seed_dir.mkdir(parents=True, exist_ok=True)
    todo = ids if overwrite else missing_label_pngs(seed_dir, ids)
    work = partial(seed_chunk, layout=layout, cam_files=cam_files, seed_dir=seed_dir, options=options)
    workers = max(1, options.num_workers)
    with tqdm(total=len(todo), desc="CRF seeds", unit="img", disable=not progress) as bar:
        for done in parallel_imap(work, chunked(todo, balanced_chunk_size(len(todo), workers, 16)), workers):
            bar.update(done)


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
    if options.seeds == "crf" and not crf_available():
        raise ConfigError(f"--seeds crf: {CRF_INSTALL_HINT}; or pass --seeds superpixel")
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
    claims = [(ckpt_dir, "refine-affinity", checkpoints, "affinity checkpoints"),
              (refined_dir, "refine", cam_files_in(refined_dir), "refined CAM files"),
              (label_dir, "refine-labels", label_pngs_in(label_dir), "label PNGs")]
    if options.seeds == "crf":  # superpixel seeds are a pseudo-label folder, claimed by that stage
        claims.append((seed_dir, "refine-seeds", label_pngs_in(seed_dir), "seed PNGs"))
    for folder, stage, existing, what in claims:
        claim_folder(folder, stage, params, inputs, overwrite=overwrite, existing=existing, what=what, writer=is_global_zero(),
                     resources=resources, sources=sources)

    # 1. seeds: the kind's two dense CRFs (IRN's or PSA's rule), or a superpixel vote with an uncertain band.
    phase = time.perf_counter()
    if options.seeds == "crf":
        make_crf_seeds(layout, ids, cam_files, seed_dir, options, overwrite=overwrite, progress=progress)
    else:
        seed_options = PseudoLabelOptions(threshold=options.bg_threshold, ignore_below=options.fg_threshold, n_segments=options.n_segments,
                                          workers=max(1, options.num_workers))
        make_pseudo_labels(layout.root, cam_dir, seed_dir, split=split, options=seed_options, overwrite=overwrite,
                           progress=progress).raise_for_failures()
    summary.no_foreground = [i for i in ids if not (read_label_png(seed_dir / f"{i}.png", labels=layout.labels) % 255).any()]
    summary.seconds["seeds"] = time.perf_counter() - phase

    # 2. the affinity net on the classifier's trunk.
    phase = time.perf_counter()
    trunk = load_classifier(checkpoint).features  # a fresh model: nothing else holds it
    hparams = dict(stride=options.stride, radius=options.train_radius, embedding=options.embedding, frozen_trunk=options.frozen_trunk,
                   lr=options.lr, weight_decay=options.weight_decay, momentum=options.momentum, kind=options.kind)
    system = AffinitySystem(trunk, **hparams)
    finished = ckpt_dir / "finished.ckpt"
    if overwrite and is_global_zero():  # redo everything: the net too
        for stale in checkpoints:
            stale.unlink(missing_ok=True)
    if finished.is_file():
        saved = read_checkpoint(finished)
        system.load_state_dict(saved["state_dict"])
        summary.trained_steps = int(saved.get("global_step", options.max_steps))
    else:
        summary.trained_steps = train_affinity(system, layout, ids, seed_dir, ckpt_dir, options, progress)
        if is_global_zero():
            with atomic_path(finished) as tmp:  # a kill mid-save leaves no half checkpoint behind
                torch.save({"state_dict": system.state_dict(), "global_step": summary.trained_steps, "hyper_parameters": hparams}, tmp)
    summary.seconds["affinity"] = time.perf_counter() - phase

    # 3. the random walk of every image's maps.
    phase = time.perf_counter()
    unlabelled = set(missing_label_pngs(label_dir, ids, options.png_mode))  # one set, not a search per id
    todo = ids if overwrite else [i for i in ids if i in unlabelled or not is_complete(refined_dir / f"{i}.npz")]
    summary.skipped = len(ids) - len(todo)
    if todo:
        predictor = RefinePredictor(system.model, options.kind, options.radius, options.beta, options.iterations, options.normalisation,
                                    options.flip, options.label_threshold, options.bg_power, options.edge_product)
        writer = RefineWriter(refined_dir, label_dir, options.png_mode)
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
