"""Data loaders whose shuffling depends only on a seed and the epoch number.

A resumed run must see the same batches as an uninterrupted one. The default
``DataLoader(shuffle=True)`` draws its permutation and its worker base seed from the
global torch RNG, so the order depends on everything that ran before. The loader built
here shuffles with ``seed + epoch`` (Lightning calls ``set_epoch`` before every epoch)
and draws its base seed from a private generator, so data loading never touches the
global RNG. Under DDP Lightning swaps the sampler for a ``DistributedSampler``, which
also shuffles by seed and epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochSeededRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose permutation is a function of ``seed`` and the epoch."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def seeded_loader(
    dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, **kwargs: Any
) -> DataLoader:
    """Return a DataLoader that shuffles by ``seed`` and epoch and leaves the global RNG alone.

    ``kwargs`` go to ``DataLoader`` (``num_workers``, ``drop_last``, ``collate_fn``, ...).
    """
    sampler = EpochSeededRandomSampler(dataset, seed=seed) if shuffle else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs
    )
