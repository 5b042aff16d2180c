"""Stage 4: train DeepLab-LargeFOV on pseudo-labels (``wsss train-seg``) and predict label PNGs
for whole images (``wsss predict-seg``).

Geometry, shared by validation and prediction so both give the same labels for the same model:
an image is padded (bottom/right, value 0 = the mean colour after normalisation) to the next
size 8k+1, where DeepLab's stride-8 logits (k+1 of them) sit exactly on pixels 0, 8, ..., 8k;
the logits are upsampled bilinearly with ``align_corners=True`` to the padded size and cropped
back to the image. Training crops are 321 = 8*40+1 for the same reason.
"""
from __future__ import annotations

import argparse
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter

from wsss.classes import IGNORE_INDEX, NUM_LABELS
from wsss.errors import ConfigError, WeightsError
from wsss.metrics import SegmentationMetric
from wsss.models.deeplab import OUTPUT_STRIDE, DeepLabLargeFOV
from wsss.stages.classify import poly_factor

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # DeepLabLargeFOV's keys inside SegmenterSystem's state dict
CRF_INSTALL_HINT = "dense CRF needs pydensecrf: pip install 'wsss[crf]' (or pip install pydensecrf2)"
# DeepLab-LargeFOV's cross-validated dense-CRF parameters on VOC (Chen et al. 2015):
# bilateral w=4, theta_xy=121, theta_rgb=5; Gaussian w=3, theta_xy=3; 10 mean-field iterations.
CRF_PARAMS = {"bi_w": 4.0, "bi_xy": 121.0, "bi_rgb": 5.0, "pos_w": 3.0, "pos_xy": 3.0, "iterations": 10}


# --------------------------------------------------------------------------- inference geometry
def aligned_size(size: int, stride: int = OUTPUT_STRIDE) -> int:
    """Smallest ``stride * k + 1 >= size`` (321 -> 321, 320 -> 321, 322 -> 329)."""
    return stride * math.ceil(max(size - 1, 0) / stride) + 1


def image_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Logits (N, C, H, W) at full resolution for normalised images (N, 3, H, W) of any size.

    Pads to 8k+1 (zeros = mean colour), runs the model, upsamples with ``align_corners=True``
    (logit j sits on pixel 8j), crops back. Returned in float32 even under bf16 autocast.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = aligned_size(height) - height, aligned_size(width) - width
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    logits = model(padded).float()
    logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=True)
    return logits[..., :height, :width]


def image_probabilities(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Softmax probabilities (C, H, W) of one normalised image (3, H, W), averaged over ``scales``
    and, with ``flip``, over horizontal flips (each pass is resized back to H x W first)."""
    height, width = image.shape[-2:]
    batch = image.unsqueeze(0)
    total: torch.Tensor | None = None
    passes = 0
    for scale in scales:
        scaled = batch
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        inputs = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        logits = image_logits(model, inputs)
        if scale != 1.0:
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        if flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        summed = probs.sum(dim=0)
        total = summed if total is None else total + summed
        passes += probs.shape[0]
    assert total is not None, "scales must not be empty"
    return total / passes


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict[str, float] = CRF_PARAMS) -> np.ndarray:
    """Refine (C, H, W) probabilities with a fully connected CRF on the (H, W, 3) uint8 image.

    Unary: -log p. Pairwise: a Gaussian (smoothness) and a bilateral (appearance) kernel with
    DeepLab's parameters. Returns refined (C, H, W) float32 marginals. Needs ``pydensecrf``.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise ConfigError(f"--crf: {CRF_INSTALL_HINT}") from None
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=params["pos_xy"], compat=params["pos_w"])
    crf.addPairwiseBilateral(sxy=params["bi_xy"], srgb=params["bi_rgb"], rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=params["bi_w"])
    marginals = crf.inference(int(params["iterations"]))
    return np.asarray(marginals, dtype=np.float32).reshape(classes, height, width)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) tensor back to the (H, W, 3) uint8 image it came from."""
    from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    pixels = ((image.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def nearest_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels (N, H, W) sampled with nearest neighbour at the ``size`` logit positions,
    with the same ``align_corners=True`` geometry as inference (321 -> 41 keeps every 8th pixel)."""
    rows = torch.linspace(0, masks.shape[-2] - 1, size[0], device=masks.device).round().long()
    cols = torch.linspace(0, masks.shape[-1] - 1, size[1], device=masks.device).round().long()
    return masks.index_select(-2, rows).index_select(-1, cols)


# --------------------------------------------------------------------------- training
class SegmenterSystem(pl.LightningModule):
    """Trains :class:`DeepLabLargeFOV` with cross-entropy (255 ignored) and scores val mIoU.

    Args:
        weights: ``imagenet`` (DeepLab's init: VGG16 convs + decimated fc6/fc7), a local
            torchvision VGG16 state-dict path, ``classifier:/path/to.ckpt`` (trunk of our stage-1
            classifier) or ``none`` (random; toys and tests).
        width: channel multiplier (1.0 = the paper's network).
        num_classes: labels incl. background (21 for VOC).
        loss_at: ``image``: logits upsampled bilinearly to the crop and compared with every label
            pixel (default); ``logits``: labels subsampled with nearest neighbour to the 1/8 logit
            grid, as DeepLab's Caffe code did.
        lr: base learning rate; DeepLab's multipliers apply per group (biases x2, fc8 x10/x20).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (not on biases).
        poly_power: exponent of the per-step poly schedule (1 - step/max_steps) ** power.
        channels_last: NHWC memory format (faster convolutions on recent GPUs).
        batch_norm: VGG16-BN trunk (toy preset only; see :class:`DeepLabLargeFOV`).
        frozen_stages: keep the first N VGG16 blocks at their initial weights (cheaper CPU steps).
    """

    def __init__(
        self,
        weights: str = "imagenet",
        width: float = 1.0,
        num_classes: int = NUM_LABELS,
        loss_at: Literal["image", "logits"] = "image",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        poly_power: float = 0.9,
        channels_last: bool = False,
        batch_norm: bool = False,
        frozen_stages: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = DeepLabLargeFOV(num_classes, weights=weights, width=width, batch_norm=batch_norm, frozen_stages=frozen_stages)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.val_metric = SegmentationMetric(num_classes, IGNORE_INDEX)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw 1/8-resolution logits (N, C, h, w)."""
        return self.model(self._prepare(images))

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy ignoring 255, at full crop resolution or on the logit grid (``loss_at``)."""
        if self.hparams.loss_at == "image":
            # Upsampling the logits scores every labelled pixel (thin parts and boundaries the
            # 1/8 grid would skip) and trains exactly what inference evaluates.
            logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=True)
        else:
            masks = nearest_labels(masks, tuple(logits.shape[-2:]))
        return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Full-size images (batch 1 in practice), the same code path as predict-seg at scale 1.
        for image, mask in zip(batch["image"], batch["mask"]):
            probs = image_probabilities(self, image)
            self.val_metric.update(probs.argmax(0), mask)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metric.compute()  # counts summed across DDP ranks before dividing
        self.log("val/mIoU", float(np.nan_to_num(scores.miou)), prog_bar=True, sync_dist=False)
        self.log("val/pixel_acc", float(np.nan_to_num(scores.pixel_accuracy)), sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.info("step %d validation:\n%s", self.global_step, scores.table())
        self.val_metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.model.optimizer_param_groups(hp.lr, hp.weight_decay)
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_factor(step, total, hp.poly_power))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning loads the weights: refuse another model's checkpoint clearly
        # (--ckpt_path given a classifier checkpoint) instead of a wall of missing keys.
        check_segmenter_state(checkpoint.get("state_dict"), self.state_dict(), "--ckpt_path checkpoint")


def check_segmenter_state(state: Any, expected: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError unless ``state`` has exactly the keys and shapes of ``expected``."""
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{source} is not a Lightning checkpoint (no 'state_dict' entry)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        looks_like = " (it looks like a stage-1 classifier checkpoint)" if any(k.startswith("model.classifier.") for k in state) else ""
        raise WeightsError(
            f"{source} is not a DeepLab-LargeFOV segmenter checkpoint{looks_like}: "
            f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "give a checkpoint written by `wsss train-seg`"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        key = wrong[0]
        raise WeightsError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)} (a different width or class count?)")


def load_segmenter(path: str | Path) -> tuple[DeepLabLargeFOV, dict[str, Any]]:
    """Build a :class:`DeepLabLargeFOV` from a ``train-seg`` checkpoint without unpickling code.

    Reads ``hyper_parameters`` (width, num_classes) and ``state_dict`` with
    ``torch.load(weights_only=True)``, checks the keys and shapes, then loads. Returns the model
    in eval mode and the hyper-parameters.
    """
    from wsss.lightning import read_checkpoint

    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    state = checkpoint.get("state_dict")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VGG16 weights='none'")  # every weight comes from the checkpoint
        model = DeepLabLargeFOV(int(hparams.get("num_classes", NUM_LABELS)), weights="none", width=float(hparams.get("width", 1.0)),
                                batch_norm=bool(hparams.get("batch_norm", False)))
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if not k.startswith("val_metric.")}
    expected = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    check_segmenter_state(state, expected, str(path))
    model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in state.items()})
    return model.eval(), hparams


# --------------------------------------------------------------------------- prediction
class SegmenterPredictor(pl.LightningModule):
    """Predict-only wrapper: multi-scale / flip softmax averaging, optional dense CRF, argmax."""

    def __init__(self, model: torch.nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False, crf: bool = False, channels_last: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.scales, self.flip, self.crf, self.channels_last = tuple(scales), flip, crf, channels_last

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=torch.channels_last) if self.channels_last else images)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, list]:
        labels = []
        for image in batch["image"]:
            probs = image_probabilities(self._forward, image, self.scales, self.flip)
            if self.crf:
                probs = torch.from_numpy(dense_crf(denormalize(image), probs.cpu().numpy()))
            labels.append(probs.argmax(0).to(torch.uint8).cpu().numpy())
        return {"id": list(batch["id"]), "labels": labels}


class LabelPNGWriter(BasePredictionWriter):
    """Writes each predicted label map to ``out_dir/<id>.png`` (VOC palette, atomic)."""

    def __init__(self, out_dir: str | Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        from wsss.io import write_label_png

        for image_id, labels in zip(prediction["id"], prediction["labels"]):
            write_label_png(self.out_dir / f"{image_id}.png", labels)


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be numbers, e.g. '0.75,1.0,1.25', got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return scales


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss predict-seg", description="Predict VOC-palette label PNGs with a trained segmenter.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `wsss train-seg` (best.ckpt / last.ckpt)")
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (or VOCdevkit, or its parent), or 'toy'")
    parser.add_argument("--out", required=True, help="output folder for <id>.png")
    parser.add_argument("--split", default="val", help="split name under ImageSets/Segmentation, or a list file (default: val)")
    parser.add_argument("--scales", type=_parse_scales, default=(1.0,), help="comma-separated test scales, e.g. 0.75,1,1.25 (default: 1.0)")
    parser.add_argument("--flip", action="store_true", help="also average horizontally flipped passes")
    parser.add_argument("--crf", action="store_true", help=f"refine with a dense CRF ({CRF_INSTALL_HINT})")
    parser.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist (default: skip them)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per predict step (each is processed at its own size)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--devices", default="auto", help="Lightning devices: auto, 1, 4, '0,1' (several = DDP, each image on one rank)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer precision bf16-mixed); probabilities stay float32")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPUs)")
    return parser


def predict_main(argv: list[str]) -> int:
    """``wsss predict-seg``: label PNGs for every image of a split."""
    from wsss.data import resolve_data_root
    from wsss.data.datasets import ImageDataset, collate_list
    from wsss.data.modules import PredictDataModule
    from wsss.data.transforms import eval_transform
    from wsss.data.voc import VOCLayout
    from wsss.io import ensure_output_dir
    from wsss.lightning import parse_devices

    args = predict_parser().parse_args(argv)
    if args.crf and not crf_available():
        raise ConfigError(f"--crf: {CRF_INSTALL_HINT}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, _ = load_segmenter(args.checkpoint)
    layout = VOCLayout(resolve_data_root(args.data_root))
    ids = layout.read_ids(args.split)
    out_dir = ensure_output_dir(args.out)
    todo = ids if args.overwrite else [i for i in ids if not (out_dir / f"{i}.png").is_file()]
    print(f"predict-seg: {len(ids)} images in '{args.split}', {len(ids) - len(todo)} already in {out_dir} (skipped), {len(todo)} to predict")
    if not todo:
        return 0
    layout.check_images(todo)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = PredictDataModule(ImageDataset(layout, todo, eval_transform()), args.batch_size, args.num_workers, collate_list)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=parse_devices(args.devices), precision="bf16-mixed" if args.bf16 else "32-true",
        logger=False, callbacks=[LabelPNGWriter(out_dir)], enable_checkpointing=False, enable_model_summary=False,
    )
    predictor = SegmenterPredictor(model, args.scales, args.flip, args.crf, args.channels_last)
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    if trainer.is_global_zero:
        print(f"wrote {len(todo)} label PNGs to {out_dir}")
    return 0


def main(argv: list[str], parse_only: bool = False) -> int:
    """``wsss train-seg``: LightningCLI over SegmenterSystem and SegmentationDataModule
    (``parse_only``: check the options and stop, as ``wsss run`` does before any stage)."""
    from wsss.data.modules import SegmentationDataModule
    from wsss.lightning import StageCLI

    cli = StageCLI(
        SegmenterSystem,
        SegmentationDataModule,
        args=argv,
        prog="wsss train-seg",
        checkpoint_dir="checkpoints/segmenter",
        monitor="val/mIoU",
        log_name="segmenter",
        parse_only=parse_only,
        last_every_n_train_steps=500,  # resume points between validations (every 2,000 steps at paper scale)
    )
    if not parse_only:
        cli.fit()
    return 0

