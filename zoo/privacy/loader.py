"""Poisson-sampled training loaders for DP-SGD, built from Opacus' data loader classes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch.utils.data import DataLoader, IterableDataset

logger = logging.getLogger(__name__)


def sampling_generator(seed: int, rank: int, steps_done: int) -> torch.Generator:
    """Return a generator for Poisson sampling that differs per process and per resume point.

    Each process draws its own inclusion decisions, and a run resumed after ``steps_done``
    steps draws fresh ones instead of replaying the masks of its first steps, because the
    accounting assumes independent sampling in every step.
    """
    state = np.random.SeedSequence([seed, rank, steps_done]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def poisson_loader(
    base: DataLoader,
    sample_rate: float,
    generator: torch.Generator,
    distributed: bool,
) -> DPDataLoader:
    """Return an Opacus ``DPDataLoader`` over ``base.dataset`` with Poisson rate ``sample_rate``.

    Only the dataset, collate function and worker settings of ``base`` carry over: its
    sampler is dropped, because Poisson sampling must replace any sampler (weighted, shuffled
    or distributed) for the accounting to hold.

    Raises:
        TypeError: if ``base`` is not a ``DataLoader`` over a map-style dataset.
    """
    if not isinstance(base, DataLoader):
        raise TypeError(
            f"DP-SGD needs the training data as a torch DataLoader, got {type(base).__name__}. "
            "Return a DataLoader from train_dataloader()."
        )
    if isinstance(base.dataset, IterableDataset):
        raise TypeError(
            "DP-SGD needs a map-style training dataset for Poisson sampling, got the "
            f"IterableDataset {type(base.dataset).__name__}."
        )
    if base.sampler is not None and type(base.sampler).__name__ not in (
        "RandomSampler",
        "SequentialSampler",
    ):
        logger.info(
            "DP-SGD: the training sampler %s is replaced by Poisson sampling.",
            type(base.sampler).__name__,
        )
    return DPDataLoader(
        dataset=base.dataset,
        sample_rate=sample_rate,
        collate_fn=base.collate_fn,
        num_workers=base.num_workers,
        pin_memory=base.pin_memory,
        timeout=base.timeout,
        worker_init_fn=base.worker_init_fn,
        multiprocessing_context=base.multiprocessing_context,
        generator=generator,
        prefetch_factor=base.prefetch_factor,
        persistent_workers=base.persistent_workers,
        distributed=distributed,
    )


class PoissonTrainLoader:
    """Training batches for one DP-SGD run: Poisson-sampled, optionally split into physical batches.

    Lightning re-creates plain ``DataLoader`` objects to insert its own samplers, which would
    undo Poisson sampling, so this wrapper is deliberately not a ``DataLoader`` subclass.

    With ``max_physical_batch_size`` set, every logical (Poisson) batch is split into chunks
    by Opacus' ``BatchSplittingSampler`` (the sampler behind ``BatchMemoryManager``), which
    signals the optimizer to accumulate all but the last chunk. The number of chunks per epoch
    is then random, so ``len()`` raises ``TypeError`` and Lightning runs each epoch until the
    data ends.

    Args:
        loader: The Poisson-sampled loader.
        optimizer: The DP optimizer that consumes the batches.
        max_physical_batch_size: Largest chunk to put through the model at once, or ``None``.
    """

    def __init__(
        self,
        loader: DPDataLoader,
        optimizer: DPOptimizer,
        max_physical_batch_size: int | None = None,
    ) -> None:
        self.poisson_loader = loader
        self.optimizer = optimizer
        self.max_physical_batch_size = max_physical_batch_size
        if max_physical_batch_size is None:
            self.loader: DataLoader = loader
        else:
            self.loader = wrap_data_loader(
                data_loader=loader, max_batch_size=max_physical_batch_size, optimizer=optimizer
            )

    @property
    def dataset(self) -> Any:
        """The training dataset."""
        return self.poisson_loader.dataset

    @property
    def sample_rate(self) -> float:
        """Probability that a given example is in a given logical batch."""
        return self.poisson_loader.sample_rate

    def __len__(self) -> int:
        if self.max_physical_batch_size is not None:
            raise TypeError("The number of physical batches per epoch is random.")
        return len(self.poisson_loader)

    def __iter__(self) -> Iterator[Any]:
        # A new pass starts: forget skip signals and partial sums that an epoch cut short
        # (limit_train_batches, max_steps) left behind, so they cannot shift onto new batches.
        # Nothing is released for the dropped partial sums, so no privacy is spent on them.
        self.optimizer._step_skip_queue.clear()
        if self.optimizer._is_last_step_skipped:
            self.optimizer._is_last_step_skipped = False
            for parameter in self.optimizer.params:
                parameter.summed_grad = None
        return iter(self.loader)
