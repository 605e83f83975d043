"""Unified Negative Pair Generation (UNPG) on top of any margin head.

Jung, Lee, Oh, Park, Park, Son, "Unified Negative Pair Generation toward
Well-discriminative Feature Space for Face Recognition", BMVC 2022 (arXiv 2203.11593).

A margin head only sees negatives of the form (feature, class proxy). UNPG adds the
feature-feature negatives of the mini-batch: the cosines of all pairs a < b with different
labels. It drops outliers among them with a Tukey fence and appends the kept cosines, without
a margin, to the softmax denominator of every sample:

    L_i = -log( e^{s p_i} / (e^{s p_i} + sum_{c != y_i} e^{s cos_ic} + sum_{v in S'} e^{s v}) )

where p_i is the head's margin logit for the target class and S' is the filtered vector.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.face.heads import MarginHead, margin_cross_entropy, upcast


def tukey_fence_filter(values: Tensor, wisk: float = 1.5) -> Tensor:
    """Keep the values inside the Tukey fences [Q1 - r*IQR, Q3 + r*IQR].

    The quartiles are read by index from the ascending sort, Q1 at ``floor(0.25 * n)`` and
    Q3 at ``floor(0.75 * n)``, without interpolation, as in the UNPG reference code
    (``torch.quantile`` interpolates and gives slightly different fences).

    Args:
        values: 1-D tensor of candidate negative-pair cosines.
        wisk: fence width r; ``math.inf`` keeps every value.

    Returns:
        The kept values, in their original order, with gradients flowing to them.
    """
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}.")
    if not wisk >= 0:
        raise ValueError(f"wisk must be non-negative (or math.inf), got {wisk!r}.")
    count = values.numel()
    if count == 0 or math.isinf(wisk):
        return values
    ordered = values.detach().sort().values
    first_quartile = ordered[int(0.25 * count)]
    third_quartile = ordered[int(0.75 * count)]
    spread = third_quartile - first_quartile
    lower = first_quartile - wisk * spread
    upper = third_quartile + wisk * spread
    detached = values.detach()
    return values[(detached >= lower) & (detached <= upper)]


def negative_pair_cosines(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Return the cosines <f_a, f_b> of all pairs a < b with different labels, as a 1-D tensor.

    The computation runs in float32 with autocast disabled.
    """
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        normalized = F.normalize(upcast(embeddings), dim=1)
        similarity = normalized @ normalized.t()
    count = labels.numel()
    upper = torch.triu(torch.ones(count, count, dtype=torch.bool, device=labels.device), 1)
    different = labels.unsqueeze(0) != labels.unsqueeze(1)
    return similarity[upper & different]


def _gather_with_gradients(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather embeddings (differentiably) and labels from every rank.

    Batches of different sizes are padded to the largest one for the collective and trimmed
    afterwards.
    """
    from torch.distributed.nn.functional import all_gather

    world_size = dist.get_world_size()
    size = torch.tensor([labels.numel()], device=labels.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padding = largest - labels.numel()
    padded_embeddings = F.pad(embeddings, (0, 0, 0, padding))
    padded_labels = F.pad(labels, (0, padding))
    gathered_embeddings = all_gather(padded_embeddings)
    gathered_labels = [torch.zeros_like(padded_labels) for _ in range(world_size)]
    dist.all_gather(gathered_labels, padded_labels)
    keep = [slice(0, int(s.item())) for s in sizes]
    return (
        torch.cat([e[k] for e, k in zip(gathered_embeddings, keep, strict=True)]),
        torch.cat([lab[k] for lab, k in zip(gathered_labels, keep, strict=True)]),
    )


class UNPGLoss(nn.Module):
    """Margin-head loss with UNPG's filtered in-batch negative pairs in the denominator.

    Args:
        head: any :class:`~zoo.face.heads.MarginHead` (ArcFace, CosFace, MagFace).
        wisk: Tukey fence width r (paper default 1.5); ``math.inf`` disables the filter.
        use_negative_pairs: if False, the loss is exactly the head's own loss.
        gather_across_ranks: under ``torch.distributed``, build the negative pairs from the
            embeddings of all ranks, gathered with gradients, and filter the global vector.
            Without an initialised process group this option has no effect.
    """

    def __init__(
        self,
        head: MarginHead,
        wisk: float = 1.5,
        use_negative_pairs: bool = True,
        gather_across_ranks: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(head, MarginHead):
            raise TypeError(f"head must be a MarginHead, got {type(head).__name__}.")
        if not wisk >= 0:
            raise ValueError(f"wisk must be non-negative (or math.inf), got {wisk!r}.")
        self.head = head
        self.wisk = float(wisk)
        self.use_negative_pairs = use_negative_pairs
        self.gather_across_ranks = gather_across_ranks

    def negatives(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Return the filtered 1-D vector S' of in-batch negative-pair cosines."""
        if self.gather_across_ranks and dist.is_available() and dist.is_initialized():
            embeddings, labels = _gather_with_gradients(embeddings, labels)
        return tukey_fence_filter(negative_pair_cosines(embeddings, labels), self.wisk)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Compute the mean UNPG loss of a batch (raw embeddings (B, D), labels (B,))."""
        if not self.use_negative_pairs:
            return self.head(embeddings, labels)
        output = self.head.margin_logits(embeddings, labels)
        negatives = self.negatives(embeddings, labels)
        loss = margin_cross_entropy(output.logits, labels, self.head.scale, negatives)
        return loss + output.regularizer
