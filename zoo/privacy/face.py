"""Face recognition with an ArcFace loss that DP-SGD can train.

:class:`zoo.face.module.FaceRecognitionModule` computes the batch loss inside its head
module, and its UNPG term pairs examples with each other, so Opacus cannot compute
per-sample gradients for it. :class:`DPFaceRecognitionModule` keeps the backbone and the
evaluation of that module. Its class proxies live in :class:`CosineProxies`, a layer that
returns per-example cosines. The function :func:`arcface_loss` applies the ArcFace margin
(Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019)
to those cosines, so each example's loss depends only on that example.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.face.heads import additive_angular_margin, upcast
from zoo.face.module import FaceRecognitionModule

logger = logging.getLogger(__name__)

#: Arguments of FaceRecognitionModule that DPFaceRecognitionModule fixes (ArcFace, no UNPG).
PARENT_ONLY_HPARAMS = ("head", "head_kwargs", "unpg", "unpg_wisk", "unpg_gather")


class CosineProxies(nn.Module):
    """Class proxies that map embeddings to their cosines with every proxy.

    The weight is normalised inside ``forward``. Opacus has no grad sampler for this layer
    and computes its per-sample gradients with torch.func, which then differentiates
    through the normalisation too, so the per-sample gradients are exact.

    Args:
        embedding_size: length of the embeddings.
        num_classes: number of training identities.
    """

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Return the (B, num_classes) float32 (float64 for float64 inputs) cosines."""
        normalized = F.normalize(upcast(embeddings), dim=1)
        proxies = F.normalize(upcast(self.weight), dim=1)
        return F.linear(normalized, proxies).clamp(-1.0, 1.0)


def arcface_loss(cosines: Tensor, labels: Tensor, scale: float, margin: float) -> Tensor:
    """Compute the mean ArcFace cross-entropy of per-example cosines.

    Args:
        cosines: (B, C) cosines to the class proxies.
        labels: (B,) int64 class indices.
        scale: logit scale s.
        margin: additive angular margin m in radians.
    """
    target = cosines.gather(1, labels[:, None])
    logits = cosines.scatter(1, labels[:, None], additive_angular_margin(target, margin))
    return F.cross_entropy(scale * logits, labels)


class DPFaceRecognitionModule(FaceRecognitionModule):
    """Face-recognition model with ArcFace and per-example losses, for the DPSGD callback.

    Evaluation (flip-test embeddings, 10-fold verification accuracy, ROC), the optimizer
    (SGD with warm-up and cosine decay) and the batch formats are those of
    :class:`zoo.face.module.FaceRecognitionModule`. Train it with
    :class:`zoo.privacy.dpsgd.DPSGD` in ``trainer.callbacks``; that callback replaces the
    backbone's BatchNorm layers with GroupNorm.

    Args:
        num_classes: number of training identities.
        backbone: backbone name, as for :func:`zoo.face.backbones.build_backbone`.
        backbone_kwargs: keyword arguments of the backbone.
        scale: ArcFace logit scale s.
        margin: ArcFace additive angular margin m in radians.
        lr: peak learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
        flip_test: at evaluation, sum the embeddings of each image and its mirror image.
        num_folds: folds of the verification accuracy protocol.
        pair_seed: seed for impostor pairs built from labels and for the fold assignment.
    """

    def __init__(
        self,
        num_classes: int = 30,
        backbone: str = "small_cnn",
        backbone_kwargs: dict[str, Any] | None = None,
        scale: float = 32.0,
        margin: float = 0.5,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        flip_test: bool = True,
        num_folds: int = 10,
        pair_seed: int = 0,
    ) -> None:
        if not (isinstance(scale, int | float) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
        if not (isinstance(margin, int | float) and 0 <= margin < math.pi / 2):
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin!r}; try 0.5.")
        super().__init__(
            num_classes=num_classes,
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            head="arcface",
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            flip_test=flip_test,
            num_folds=num_folds,
            pair_seed=pair_seed,
        )
        # The parent's head computes a batch loss, which Opacus cannot split per example.
        del self.loss
        self.save_hyperparameters()
        # save_hyperparameters merges in the parent's arguments; drop the head and UNPG ones,
        # which this class does not take, so checkpoints reload with cls(**hparams).
        for name in PARENT_ONLY_HPARAMS:
            self.hparams.pop(name, None)
            self._hparams_initial.pop(name, None)
        self.proxies = CosineProxies(self.backbone.embedding_size, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the proxies for ``num_classes`` new identities (fine-tuning)."""
        self.proxies = CosineProxies(self.backbone.embedding_size, num_classes).to(self.device)
        self.hparams.num_classes = num_classes

    def training_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return the mean ArcFace loss of a batch; each term depends on one example only."""
        cosines = self.proxies(self(images))
        return arcface_loss(cosines, labels, self.hparams.scale, self.hparams.margin)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        loss = self.training_loss(images, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at step {self.global_step}; lower "
                "model.init_args.lr or scale."
            )
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss
