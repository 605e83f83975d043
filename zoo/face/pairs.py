"""Verification pair lists: seeded genuine/impostor pairs and their CSV form."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def make_verification_pairs(labels: Tensor, seed: int = 0) -> Tensor:
    """Build all genuine pairs and an equal number of seeded impostor pairs.

    Every pair (i, j) with i < j and ``labels[i] == labels[j]`` is a genuine pair, so an
    identity with one image contributes none. Impostor pairs are drawn without replacement,
    uniformly from all pairs with different labels, with a generator seeded by ``seed``.
    If fewer impostor pairs exist than genuine ones, all of them are used.

    Args:
        labels: 1-D identity labels of the verification images.
        seed: seed of the impostor draw.

    Returns:
        int64 tensor of shape (P, 3): rows ``[left, right, is_same]``, genuine pairs first,
        each group in ascending (left, right) order.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}.")
    count = labels.numel()
    # NOTE: enumerates all count * (count - 1) / 2 index pairs, which suits up to a few
    # thousand verification images; larger sets need a sampling scheme instead.
    left, right = torch.triu_indices(count, count, offset=1)
    same = labels[left] == labels[right]
    genuine = torch.stack([left[same], right[same]], dim=1)
    impostor = torch.stack([left[~same], right[~same]], dim=1)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(impostor.shape[0], generator=generator)[: genuine.shape[0]]
    impostor = impostor[chosen.sort().values]
    pairs = torch.cat([genuine, impostor])
    flags = torch.cat([torch.ones(len(genuine)), torch.zeros(len(impostor))]).long()
    return torch.cat([pairs, flags.unsqueeze(1)], dim=1)


def save_pairs_csv(pairs: Tensor, names: Sequence[str], path: str | Path) -> Path:
    """Write a pair list as CSV with columns ``left,right,is_same`` (image names, 0/1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["left", "right", "is_same"])
        for left, right, is_same in pairs.tolist():
            writer.writerow([names[left], names[right], is_same])
    logger.info("Saved %d verification pairs to %s", len(pairs), path)
    return path
