"""Margin-based classification heads for face recognition.

Each head stores one learnable proxy vector per training identity (the rows of ``weight``)
and turns raw embeddings into cosine logits with a margin on the target class:

- ArcFace: cos(theta + m). Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin
  Loss for Deep Face Recognition", CVPR 2019.
- CosFace: cos(theta) - m. Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
  Recognition", CVPR 2018.
- MagFace: cos(theta + m(|f|)) with a margin that grows with the feature norm, plus the
  norm regulariser g(|f|) = 1/|f| + |f|/u_a^2. Meng, Zhao, Jiang, Wang, "MagFace: A
  Universal Representation for Face Recognition and Quality Assessment", CVPR 2021.

The heads are plain ``nn.Module``s and work without Lightning. All cosine and margin
arithmetic runs in float32 (float64 inputs stay float64) with autocast disabled, and cosines
are clamped before ``arccos``, so inputs in bf16/fp16 and cosines of exactly +1 or -1 give
finite losses and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Cosines are clamped to [-1 + eps, 1 - eps] before arccos: the derivative of arccos is
# infinite at +-1, and float32 spacing near 1 is about 6e-8, so 1e-7 stays representable.
ARCCOS_EPS = 1e-7


def upcast(tensor: Tensor) -> Tensor:
    """Return ``tensor`` in float32, or unchanged if it is float64 (for gradient checks)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@dataclass
class MarginLogits:
    """Output of a margin head before scaling.

    Attributes:
        logits: tensor of shape (B, C) in float32 (float64 for float64 inputs): cosine to
            every class proxy, with the margin applied in the target column, not yet
            multiplied by the scale.
        regularizer: float32 scalar added to the loss (zero except for MagFace).
    """

    logits: Tensor
    regularizer: Tensor


def margin_cross_entropy(
    logits: Tensor, labels: Tensor, scale: float, extra_negatives: Tensor | None = None
) -> Tensor:
    """Compute the softmax cross-entropy of ``scale * logits`` in float32.

    Args:
        logits: (B, C) margin logits; ``labels`` index their columns.
        labels: (B,) int64 class indices.
        scale: logit scale s.
        extra_negatives: optional 1-D vector of cosines added, scaled but without a margin, to
            every row's softmax denominator (UNPG's negative pairs). Because the vector is the
            same for all rows, it enters as one extra column holding ``logsumexp(s * v)``,
            which equals appending all of its entries but costs B x (C + 1) memory.
    """
    scaled = scale * upcast(logits)
    if extra_negatives is not None and extra_negatives.numel():
        pooled = torch.logsumexp(scale * upcast(extra_negatives), dim=0)
        scaled = torch.cat([scaled, pooled.expand(scaled.shape[0], 1)], dim=1)
    return F.cross_entropy(scaled, labels)


def additive_angular_margin(
    target_cosine: Tensor, margin: Tensor | float, easy_margin: bool = False
) -> Tensor:
    """Return cos(theta + m) for target cosines, with the usual fallback past theta = pi - m.

    Args:
        target_cosine: float32 cosines of each sample to its own class proxy, any shape.
        margin: additive angular margin m in radians, a float or a tensor broadcastable to
            ``target_cosine`` (per-sample margins for MagFace).
        easy_margin: if True, apply the margin only where cos(theta) > 0 and keep cos(theta)
            elsewhere. If False, use the insightface fallback cos(theta) - m * sin(m) where
            theta + m would exceed pi, so that the logit stays monotonic in theta.

    Returns:
        float32 tensor shaped like ``target_cosine``.
    """
    margin = torch.as_tensor(margin, dtype=target_cosine.dtype, device=target_cosine.device)
    clamped = target_cosine.clamp(-1.0 + ARCCOS_EPS, 1.0 - ARCCOS_EPS)
    with_margin = torch.cos(torch.acos(clamped) + margin)
    if easy_margin:
        return torch.where(target_cosine > 0, with_margin, target_cosine)
    threshold = torch.cos(math.pi - margin)
    fallback = target_cosine - torch.sin(math.pi - margin) * margin
    return torch.where(target_cosine > threshold, with_margin, fallback)


class MarginHead(nn.Module):
    """Base class: class proxies, cosine logits and the cross-entropy loss.

    Subclasses implement :meth:`margin_logits`. Calling the head returns the scalar loss.

    Args:
        embedding_size: length of the embeddings the backbone produces.
        num_classes: number of training identities.
        scale: logit scale s multiplied into the cosines before the softmax.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}; face heads use 30-64.")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: Tensor) -> Tensor:
        """Return the (B, C) float32 (or float64) cosines between embeddings and class proxies."""
        self._check_embeddings(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            normalized = F.normalize(upcast(embeddings), dim=1)
            proxies = F.normalize(upcast(self.weight), dim=1)
            return (normalized @ proxies.t()).clamp(-1.0, 1.0)

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> MarginLogits:
        """Return the unscaled margin logits and the regulariser for a batch."""
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Compute the mean margin softmax loss of a batch.

        Args:
            embeddings: raw (not normalised) embeddings of shape (B, embedding_size).
            labels: int64 class indices of shape (B,), each in [0, num_classes).
        """
        output = self.margin_logits(embeddings, labels)
        return margin_cross_entropy(output.logits, labels, self.scale) + output.regularizer

    def _check_embeddings(self, embeddings: Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"Expected embeddings of shape (batch, {self.embedding_size}), got "
                f"{tuple(embeddings.shape)}; set the head's embedding_size to the backbone's."
            )

    def _target_column(self, labels: Tensor) -> Tensor:
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got min {int(labels.min())} and "
                f"max {int(labels.max())}; set num_classes to the number of training identities."
            )
        return labels.long().unsqueeze(1)

    def _replace_target(self, cosine: Tensor, labels: Tensor, target: Tensor) -> Tensor:
        return cosine.scatter(1, labels.long().unsqueeze(1), target.unsqueeze(1))

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


class ArcFace(MarginHead):
    """ArcFace head: logit cos(theta + m) for the target class.

    Args:
        embedding_size: length of the embeddings.
        num_classes: number of training identities.
        scale: logit scale s (insightface default 64).
        margin: additive angular margin m in radians (default 0.5).
        easy_margin: apply the margin only where cos(theta) > 0 (see
            :func:`additive_angular_margin`).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin must be in [0, pi/2) radians, got {margin!r}.")
        self.margin = float(margin)
        self.easy_margin = easy_margin

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> MarginLogits:
        column = self._target_column(labels)
        cosine = self.cosine(embeddings)
        target = additive_angular_margin(
            cosine.gather(1, column).squeeze(1), self.margin, self.easy_margin
        )
        zero = cosine.new_zeros(())
        return MarginLogits(self._replace_target(cosine, labels, target), zero)


class CosFace(MarginHead):
    """CosFace head: logit cos(theta) - m for the target class.

    Args:
        embedding_size: length of the embeddings.
        num_classes: number of training identities.
        scale: logit scale s (default 64).
        margin: additive cosine margin m (default 0.35, the CosFace paper's value).
    """

    def __init__(
        self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.35
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0 <= margin < 2:
            raise ValueError(f"CosFace margin must be in [0, 2), got {margin!r}.")
        self.margin = float(margin)

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> MarginLogits:
        column = self._target_column(labels)
        cosine = self.cosine(embeddings)
        target = cosine.gather(1, column).squeeze(1) - self.margin
        return MarginLogits(self._replace_target(cosine, labels, target), cosine.new_zeros(()))


class MagFace(MarginHead):
    """MagFace head: an ArcFace margin that grows linearly with the feature norm.

    The norm |f| is clamped to [lower_norm, upper_norm] and mapped linearly onto the margin
    range [lower_margin, upper_margin]. The loss adds ``lambda_g * mean(1/|f| + |f|/u_a^2)``,
    which pulls norms of easy samples up.

    Args:
        embedding_size: length of the embeddings.
        num_classes: number of training identities.
        scale: logit scale s (default 64).
        lower_margin: margin at the lower norm bound (l_m, default 0.45).
        upper_margin: margin at the upper norm bound (u_m, default 0.8).
        lower_norm: lower feature-norm bound (l_a, default 10).
        upper_norm: upper feature-norm bound (u_a, default 110).
        lambda_g: weight of the norm regulariser (default 35).
        easy_margin: apply the margin only where cos(theta) > 0.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        lower_margin: float = 0.45,
        upper_margin: float = 0.8,
        lower_norm: float = 10.0,
        upper_norm: float = 110.0,
        lambda_g: float = 35.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0 <= lower_margin <= upper_margin < math.pi / 2:
            raise ValueError(
                "MagFace margins must satisfy 0 <= lower_margin <= upper_margin < pi/2, got "
                f"lower_margin={lower_margin!r}, upper_margin={upper_margin!r}."
            )
        if not 0 < lower_norm < upper_norm:
            raise ValueError(
                "MagFace norm bounds must satisfy 0 < lower_norm < upper_norm, got "
                f"lower_norm={lower_norm!r}, upper_norm={upper_norm!r}."
            )
        if lambda_g < 0:
            raise ValueError(f"lambda_g must be non-negative, got {lambda_g!r}.")
        self.lower_margin = float(lower_margin)
        self.upper_margin = float(upper_margin)
        self.lower_norm = float(lower_norm)
        self.upper_norm = float(upper_norm)
        self.lambda_g = float(lambda_g)
        self.easy_margin = easy_margin

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> MarginLogits:
        column = self._target_column(labels)
        cosine = self.cosine(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            norm = upcast(embeddings).norm(dim=1).clamp(self.lower_norm, self.upper_norm)
            slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
            margin = self.lower_margin + slope * (norm - self.lower_norm)
            target = additive_angular_margin(
                cosine.gather(1, column).squeeze(1), margin, self.easy_margin
            )
            regularizer = 1.0 / norm + norm / self.upper_norm**2
        logits = self._replace_target(cosine, labels, target)
        return MarginLogits(logits, self.lambda_g * regularizer.mean())


HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace, "magface": MagFace}


def build_head(name: str, embedding_size: int, num_classes: int, **kwargs: float) -> MarginHead:
    """Build a margin head by name ("arcface", "cosface" or "magface").

    Raises:
        ValueError: if ``name`` is not a registered head.
    """
    if name not in HEADS:
        raise ValueError(f"Unknown margin head {name!r}; choose one of {sorted(HEADS)}.")
    return HEADS[name](embedding_size, num_classes, **kwargs)
