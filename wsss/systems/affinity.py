"""The refinement's two Lightning modules: :class:`AffinitySystem` trains PSA's AffinityNet or
IRN's BoundaryNet on pair labels from CAM seeds; :class:`RefinePredictor` random-walks every
image's CAMs along its affinities and labels them by the reference's rule (:mod:`wsss.affinity`)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from wsss.affinity import (affinities_of, affinity_labels, affinity_loss, boundary_walk, neighbour_offsets, normalise_walked, random_walk,
                           to_grid, to_image)
from wsss.models.affinity import AffinityNet, BoundaryNet, flip_averaged_boundary
from wsss.pseudo import cam_seed_labels
from wsss.systems.schedules import per_step_schedule, schedule_factor

KINDS = ("boundary", "embedding")


def has_batch_norm(trunk: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules())


def affinity_model(trunk: nn.Sequential, kind: str, stride: int, embedding: int, frozen_trunk: bool) -> AffinityNet | BoundaryNet:
    """IRN's boundary branch (``boundary``, stride 4 only) or PSA's embedding (``embedding``)."""
    if kind == "boundary":
        if stride != BoundaryNet.stride:
            raise ValueError(f"the boundary net's map is at stride {BoundaryNet.stride} (IRN's), got stride {stride}")
        return BoundaryNet(trunk, has_batch_norm(trunk), frozen_trunk)
    if kind == "embedding":
        return AffinityNet(trunk, has_batch_norm(trunk), stride, embedding, frozen_trunk)
    raise ValueError(f"affinity kind {kind!r} unknown; choose from {', '.join(KINDS)}")


class AffinitySystem(pl.LightningModule):
    """An affinity net on ``trunk`` (the classifier's VGG16 features), trained with PSA's and IRN's
    balanced pair loss (bg/4 + fg/4 + neg/2) on seed crops: each batch is ``{"image" (N, 3, S, S),
    "mask" (N, S, S) seed labels}``, the seeds sampled at the centre of every ``stride`` cell,
    pairs within ``radius`` cells (IRN trains with 10, PSA with 5). SGD with a poly schedule over
    the run's steps; the heads at ``lr``, a trainable trunk at lr/10. Both references build their
    SGD as ``SGD(params, lr, weight_decay)``, which puts the weight decay in momentum's place: their
    momentum is the weight decay's value (1e-4 for IRN), not 0.9."""

    def __init__(self, trunk: nn.Sequential, stride: int = 4, radius: int = 10, embedding: int = 448, frozen_trunk: bool = True,
                 lr: float = 0.1, weight_decay: float = 1e-4, momentum: float = 1e-4, kind: str = "boundary"):
        super().__init__()
        self.save_hyperparameters(ignore=["trunk"])
        self.model = affinity_model(trunk, kind, stride, embedding, frozen_trunk)
        self.offsets = neighbour_offsets(radius)

    def seeds_on_grid(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, h, w) seed labels at the centre pixel of each ``stride`` cell (255 past the crop)."""
        s = self.hparams.stride
        h, w = -(-mask.shape[-2] // s), -(-mask.shape[-1] // s)
        padded = torch.full((mask.shape[0], h * s, w * s), 255, dtype=mask.dtype, device=mask.device)
        padded[:, :mask.shape[-2], :mask.shape[-1]] = mask
        return padded[:, s // 2::s, s // 2::s]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self.model(batch["image"])
        affinities = affinities_of(output, self.offsets, self.hparams.kind)
        labels = affinity_labels(self.seeds_on_grid(batch["mask"]), self.offsets)
        parts = affinity_loss(affinities, labels)
        self.log_dict({f"train/{name}": value for name, value in parts.items()}, prog_bar=False, batch_size=len(output))
        self.log("train/loss", parts["total"], prog_bar=True, batch_size=len(output))
        return parts["total"]

    def configure_optimizers(self):
        hp = self.hparams
        heads = [p for name, p in self.model.named_parameters() if not name.startswith("taps.") and p.requires_grad]
        trunk = [p for p in self.model.trunk.parameters() if p.requires_grad]
        groups = [{"params": heads, "lr": hp.lr}] + ([{"params": trunk, "lr": hp.lr / 10}] if trunk else [])
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return per_step_schedule(optimizer, schedule_factor("poly", int(self.trainer.estimated_stepping_batches), 0.9))


class RefinePredictor(pl.LightningModule):
    """Per image: its CAMs (read by the dataset, at the image size) averaged onto the affinity grid,
    random-walked ``iterations`` steps along affinities^``beta`` of the pairs within ``radius``,
    upsampled by the stride and cropped, normalised (``global``: IRN; ``per_class``), and labelled.

    ``boundary`` (IRN's ``make_sem_seg_labels``): the boundary map (averaged with the mirror
    image's when ``flip``), the maps times (1 - boundary) walked (:func:`~wsss.affinity.boundary_walk`),
    labels argmax([``label_threshold``, maps]). ``embedding`` (PSA's ``infer_aff``): a background
    map (1 - max of the CAMs)^``bg_power`` walked with the classes, labels the argmax of the walked
    maps with no threshold. Items: ``{"id", "classes", "cams" (K, H, W) float32, "labels" (H, W) uint8}``."""

    def __init__(self, model: AffinityNet | BoundaryNet, kind: str, radius: int = 5, beta: float = 10.0, iterations: int = 256,
                 normalisation: str = "global", flip: bool = True, label_threshold: float = 0.25, bg_power: float = 16.0,
                 edge_product: bool = True):
        super().__init__()
        self.model = model.eval()
        self.kind, self.radius, self.offsets, self.beta, self.iterations = kind, radius, neighbour_offsets(radius), beta, iterations
        self.normalisation, self.flip, self.label_threshold, self.bg_power = normalisation, flip, label_threshold, bg_power
        self.edge_product = edge_product

    def refine(self, image: torch.Tensor, cams: torch.Tensor, classes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Refined (K, H, W) maps and (H, W) labels of one image (3, H, W) with maps (K, H, W)."""
        size, stride = tuple(image.shape[-2:]), self.model.stride
        if self.kind == "boundary":
            boundary = flip_averaged_boundary(self.model, image) if self.flip else torch.sigmoid(self.model(image[None])[0, 0])
            boundary = boundary.float()
            walked = boundary_walk(to_grid(cams, tuple(boundary.shape)), boundary, radius=self.radius, beta=self.beta, steps=self.iterations,
                                   edge_product=self.edge_product)
            refined = normalise_walked(to_image(walked, size, stride), self.normalisation)
            return refined, cam_seed_labels(refined.cpu().numpy(), classes, self.label_threshold)
        output = self.model(image.unsqueeze(0))
        affinities = affinities_of(output, self.offsets, self.kind)[0]
        background = (1 - cams.amax(dim=0, keepdim=True)) ** self.bg_power
        walked = random_walk(to_grid(torch.cat([background, cams]), tuple(output.shape[-2:])), affinities, self.offsets, self.beta,
                             self.iterations)
        walked = to_image(walked, size, stride)
        labels = np.concatenate([[0], classes]).astype(np.uint8)[walked.argmax(dim=0).cpu().numpy()]
        return normalise_walked(walked[1:], self.normalisation), labels

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        results = []
        for image_id, image, cams, classes in zip(batch["id"], batch["image"], batch["cams"], batch["classes"]):
            classes = np.asarray(classes, dtype=np.int64)
            if len(classes):
                refined, labels = self.refine(image, cams, classes)
            else:
                refined, labels = cams, np.zeros(tuple(image.shape[-2:]), np.uint8)
            results.append({"id": image_id, "classes": classes, "cams": refined.cpu().numpy().astype(np.float32), "labels": labels})
        return results
