"""LightningModule for face recognition: backbone + margin head (+ UNPG), verified every epoch."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from zoo.face.backbones import build_backbone
from zoo.face.heads import HEADS, build_head
from zoo.face.pairs import make_verification_pairs
from zoo.face.plots import roc_figure
from zoo.face.unpg import UNPGLoss
from zoo.face.verification import pair_cosines, verification_metrics

logger = logging.getLogger(__name__)


class FaceRecognitionModule(pl.LightningModule):
    """Face-recognition model trained with a margin head, optionally wrapped by UNPG.

    Training batches are ``(images, labels)`` or ``(images, labels, indices)``. Validation
    and test batches are ``(images, labels, indices)``: the embeddings of all ranks are
    gathered, the pairs come from the datamodule's ``verification_pairs`` tensor (rows
    ``[left, right, is_same]`` indexing the images by ``indices``), or are built from the
    labels when the datamodule has none. Each validation epoch logs ``val/accuracy``
    (10-fold), ``val/accuracy_std``, ``val/auc``, ``val/tar_at_far_0.01``,
    ``val/tar_at_far_0.001``, ``val/threshold``, ``val/min_genuine``, ``val/max_impostor``
    and a ROC-curve figure.

    Args:
        num_classes: number of training identities (rows of the head's proxy matrix).
        backbone: backbone name: ``small_cnn``, ``iresnet18``, ``iresnet34``, ``iresnet50``
            or ``iresnet100``.
        backbone_kwargs: keyword arguments of the backbone (``embedding_size``,
            ``in_channels``, ``input_size``, ``width``, ``dropout``).
        head: margin head name: ``arcface``, ``cosface`` or ``magface``.
        head_kwargs: keyword arguments of the head (``scale``, ``margin``, ...).
        unpg: add UNPG's filtered in-batch negative pairs to the loss.
        unpg_wisk: Tukey fence width r of the UNPG filter (paper default 1.5).
        unpg_gather: under DDP, build UNPG's negative pairs from all ranks' embeddings.
        lr: peak learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay, applied to all parameters including the proxies.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay; may be
            fractional.
        flip_test: at evaluation, sum the embeddings of each image and its mirror image.
        num_folds: folds of the verification accuracy protocol.
        pair_seed: seed for impostor pairs built from labels and for the fold assignment.
    """

    def __init__(
        self,
        num_classes: int = 30,
        backbone: str = "small_cnn",
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "arcface",
        head_kwargs: dict[str, Any] | None = None,
        unpg: bool = False,
        unpg_wisk: float = 1.5,
        unpg_gather: bool = False,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 3.0,
        flip_test: bool = True,
        num_folds: int = 10,
        pair_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if head not in HEADS:
            raise ValueError(f"Unknown margin head {head!r}; choose one of {sorted(HEADS)}.")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be non-negative, got {warmup_epochs!r}.")
        self.backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        margin_head = build_head(
            head, self.backbone.embedding_size, num_classes, **(head_kwargs or {})
        )
        self.loss = UNPGLoss(
            margin_head, wisk=unpg_wisk, use_negative_pairs=unpg, gather_across_ranks=unpg_gather
        )
        self._outputs: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, images: Tensor) -> Tensor:
        """Return raw embeddings (B, embedding_size) of images (B, C, H, W) in [-1, 1]."""
        expected = (self.backbone.in_channels, *self.backbone.input_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"for backbone {self.hparams.backbone!r}, got {tuple(images.shape)}; set the "
                "datamodule's image_size and channels to the backbone's input_size and "
                "in_channels."
            )
        return self.backbone(images)

    def embed(self, images: Tensor) -> Tensor:
        """Return L2-normalised evaluation embeddings, with the mirror image added if set."""
        embeddings = self(images)
        if self.hparams.flip_test:
            embeddings = embeddings + self(images.flip(3))
        return torch.nn.functional.normalize(embeddings.float(), dim=1)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the margin head's proxies for ``num_classes`` new identities (fine-tuning)."""
        hparams = self.hparams
        head = build_head(
            hparams.head, self.backbone.embedding_size, num_classes, **(hparams.head_kwargs or {})
        )
        self.loss.head = head.to(self.device)
        hparams.num_classes = num_classes

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        classes = getattr(datamodule, "num_classes", None)
        if stage == "fit" and classes is not None and classes != self.hparams.num_classes:
            raise ValueError(
                f"The datamodule has {classes} training identities but the model was built "
                f"for num_classes={self.hparams.num_classes}; set model.init_args.num_classes "
                f"to {classes}, or call reset_classifier({classes}) on a pretrained model."
            )

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        loss = self.loss(self(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at step {self.global_step}; lower "
                "model.init_args.lr or the head's scale."
            )
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        images, labels, indices = batch
        self._outputs.append((self.embed(images), labels, indices))

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.embed(images)

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def on_validation_epoch_end(self) -> None:
        self._log_verification("val")

    def on_test_epoch_end(self) -> None:
        self._log_verification("test")

    def _gathered_outputs(self) -> tuple[Tensor, Tensor]:
        embeddings = torch.cat([o[0] for o in self._outputs])
        labels = torch.cat([o[1] for o in self._outputs])
        indices = torch.cat([o[2] for o in self._outputs])
        self._outputs = []
        if self.trainer.world_size > 1:
            # The distributed sampler gives every rank the same number of samples (padding
            # with repeats), so the shapes match for all_gather; repeats are removed below.
            embeddings = self.all_gather(embeddings).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
            indices = self.all_gather(indices).flatten(0, 1)
        count = int(indices.max()) + 1
        ordered = embeddings.new_zeros(count, embeddings.shape[1])
        ordered_labels = labels.new_full((count,), -1)
        ordered[indices] = embeddings
        ordered_labels[indices] = labels
        missing = count - int(torch.unique(indices).numel())
        if missing:
            raise RuntimeError(
                f"{missing} of {count} verification images produced no embedding; the "
                "validation DataLoader must visit every index from 0 to len(dataset) - 1."
            )
        return ordered, ordered_labels

    def verification_pairs(self, labels: Tensor) -> Tensor:
        """Return the datamodule's pair list, or pairs built from the labels."""
        datamodule = getattr(self.trainer, "datamodule", None)
        pairs = getattr(datamodule, "verification_pairs", None)
        if pairs is None:
            if bool((labels < 0).any()):
                raise ValueError(
                    "Validation labels are -1 (unknown) and the datamodule has no "
                    "verification_pairs; give it a tensor of rows [left, right, is_same]."
                )
            pairs = make_verification_pairs(labels.cpu(), self.hparams.pair_seed)
        return pairs.to(labels.device)

    def _log_verification(self, prefix: str) -> None:
        if not self._outputs:
            rank_zero_warn(f"No {prefix} batches ran, so no verification metrics are logged.")
            return
        embeddings, labels = self._gathered_outputs()
        pairs = self.verification_pairs(labels)
        scores = pair_cosines(embeddings, pairs)
        is_same = pairs[:, 2].bool()
        metrics = verification_metrics(
            scores, is_same, self.hparams.num_folds, seed=self.hparams.pair_seed
        )
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "accuracy")
        if not self.trainer.sanity_checking:
            from zoo.callbacks.figures import log_figure

            log_figure(self.trainer, f"{prefix}/roc", roc_figure(scores, is_same, metrics))

    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hparams.lr,
            momentum=hparams.momentum,
            weight_decay=hparams.weight_decay,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs
        steps_per_epoch = total_steps / max_epochs if max_epochs and max_epochs > 0 else total_steps
        warmup_steps = min(int(hparams.warmup_epochs * steps_per_epoch), total_steps // 2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Return the learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
