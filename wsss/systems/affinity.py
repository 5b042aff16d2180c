"""The refinement's two Lightning modules: :class:`AffinitySystem` trains AffinityNet on pair
labels from CAM seeds; :class:`RefinePredictor` random-walks every image's CAMs along its
affinities (:mod:`wsss.affinity`)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from wsss.affinity import affinities_of, affinity_labels, affinity_loss, neighbour_offsets, random_walk, to_grid, to_image
from wsss.models.affinity import AffinityNet
from wsss.systems.schedules import per_step_schedule, schedule_factor


def has_batch_norm(trunk: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules())


class AffinitySystem(pl.LightningModule):
    """AffinityNet on ``trunk`` (the classifier's VGG16 features), trained with PSA's balanced
    pair loss on seed crops: each batch is ``{"image" (N, 3, S, S), "mask" (N, S, S) seed labels}``,
    the seeds sampled at the centre of every ``stride`` cell, pairs within ``radius`` cells.
    SGD with a poly schedule over the run's steps; the heads at ``lr``, a trainable trunk at lr/10."""

    def __init__(self, trunk: nn.Sequential, stride: int = 8, radius: int = 5, embedding: int = 448, frozen_trunk: bool = True,
                 lr: float = 0.01, weight_decay: float = 5e-4, momentum: float = 0.9, kind: str = "embedding"):
        super().__init__()
        self.save_hyperparameters(ignore=["trunk"])
        self.model = AffinityNet(trunk, has_batch_norm(trunk), stride, 1 if kind == "boundary" else embedding, frozen_trunk)
        self.offsets = neighbour_offsets(radius)

    def seeds_on_grid(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, h, w) seed labels at the centre pixel of each ``stride`` cell (255 past the crop)."""
        s = self.hparams.stride
        h, w = -(-mask.shape[-2] // s), -(-mask.shape[-1] // s)
        padded = torch.full((mask.shape[0], h * s, w * s), 255, dtype=mask.dtype, device=mask.device)
        padded[:, :mask.shape[-2], :mask.shape[-1]] = mask
        return padded[:, s // 2::s, s // 2::s]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.model(batch["image"])
        affinities = affinities_of(features, self.offsets, self.hparams.kind)
        labels = affinity_labels(self.seeds_on_grid(batch["mask"]), self.offsets)
        parts = affinity_loss(affinities, labels)
        self.log_dict({f"train/{name}": value for name, value in parts.items()}, prog_bar=False, batch_size=len(features))
        self.log("train/loss", parts["total"], prog_bar=True, batch_size=len(features))
        return parts["total"]

    def configure_optimizers(self):
        hp = self.hparams
        heads = [p for name, p in self.model.named_parameters() if not name.startswith("trunk.") and p.requires_grad]
        trunk = [p for p in self.model.trunk.parameters() if p.requires_grad]
        groups = [{"params": heads, "lr": hp.lr}] + ([{"params": trunk, "lr": hp.lr / 10}] if trunk else [])
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return per_step_schedule(optimizer, schedule_factor("poly", int(self.trainer.estimated_stepping_batches), 0.9))


class RefinePredictor(pl.LightningModule):
    """Per image: its CAMs (read by the dataset, at the image size) averaged onto the affinity grid,
    random-walked ``iterations`` steps with affinities^``beta`` between cells within ``radius``,
    upsampled back, each class map divided by its maximum. Items: ``{"id", "classes", "cams"
    (K, H, W) float32 refined, "seed_cams" (K, H, W) the input maps}``."""

    def __init__(self, model: AffinityNet, radius: int = 5, beta: float = 8.0, iterations: int = 256, kind: str = "embedding"):
        super().__init__()
        self.model = model.eval()
        self.offsets, self.beta, self.iterations, self.kind = neighbour_offsets(radius), beta, iterations, kind

    def refine(self, image: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """(K, H, W) refined maps of one image (3, H, W) and its maps (K, H, W)."""
        size = tuple(image.shape[-2:])
        output = self.model(image.unsqueeze(0))
        grid = tuple(output.shape[-2:])
        affinities = affinities_of(output, self.offsets, self.kind)[0]
        walked = random_walk(to_grid(cams, grid), affinities, self.offsets, self.beta, self.iterations)
        refined = to_image(walked, size)
        peak = refined.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
        return (refined / peak).clamp(0, 1) * (refined.flatten(1).amax(dim=1) > 0)[:, None, None]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        results = []
        for image_id, image, cams, classes in zip(batch["id"], batch["image"], batch["cams"], batch["classes"]):
            refined = self.refine(image, cams) if len(classes) else cams
            results.append({"id": image_id, "classes": np.asarray(classes), "cams": refined.cpu().numpy().astype(np.float32)})
        return results
