"""Poisson-sampled training loaders for DP-SGD, built from Opacus' data loader classes."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch.utils.data import DataLoader, IterableDataset, Sampler

logger = logging.getLogger(__name__)


def sampling_generator(seed: int, steps_done: int) -> torch.Generator:
    """Return the generator of the Poisson sampling for a run that resumes after ``steps_done``.

    A resumed run draws fresh inclusion decisions instead of replaying the masks of its first
    steps, because the accounting assumes independent sampling in every step. Under DDP all
    processes use the same generator, so they draw the same global mask.
    """
    state = np.random.SeedSequence([seed, steps_done]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def noise_generator(seed: int, steps_done: int, rank: int, device: torch.device) -> torch.Generator:
    """Return the generator of the DP noise of one process, on the parameters' device.

    Its stream differs from the sampling stream of :func:`sampling_generator` and from the
    other processes' streams. Under DDP only rank 0 adds noise, but every rank gets its own
    stream all the same.
    """
    state = np.random.SeedSequence([seed, steps_done, rank, 1]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


class DistributedPoissonBatchSampler(Sampler[list[int]]):
    """Poisson batches for DDP processes that agree on the number of physical batches.

    Every process draws the same global Poisson mask over the whole dataset (each example
    enters the logical batch independently with probability ``sample_rate``) and keeps the
    chosen indices ``i`` with ``i % world_size == rank``. Because each process can count the
    share of every other one, all of them split a logical batch into the same number of
    physical batches, the largest ``ceil(share / max_batch_size)`` over the processes. This
    matters because Lightning 2.6 runs a collective operation before every training batch,
    so processes with different batch counts would deadlock. Opacus'
    ``DistributedUniformWithReplacementSampler`` and ``BatchSplittingSampler`` split per
    process, so their counts differ.

    Each physical batch but the last of a logical batch signals the optimizer to skip the
    step and only accumulate clipped gradients, as ``BatchSplittingSampler`` does.

    Args:
        num_samples: Dataset size.
        sample_rate: Inclusion probability of each example in each logical batch.
        steps: Logical batches per epoch.
        rank: This process' rank.
        world_size: Number of processes.
        generator: Generator seeded identically in every process.
        optimizer: The DP optimizer that receives the skip signals.
        max_batch_size: Largest physical batch, or ``None`` for one physical batch per step.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        rank: int,
        world_size: int,
        generator: torch.Generator,
        optimizer: DPOptimizer,
        max_batch_size: int | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.rank = rank
        self.world_size = world_size
        self.generator = generator
        self.optimizer = optimizer
        self.max_batch_size = max_batch_size
        owner = torch.arange(num_samples) % world_size
        self._owner = owner

    def __len__(self) -> int:
        if self.max_batch_size is not None:
            raise TypeError("The number of physical batches per epoch is random.")
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            chosen = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            shares = torch.bincount(self._owner[chosen], minlength=self.world_size)
            mine = torch.nonzero(chosen & (self._owner == self.rank)).flatten()
            chunks = 1
            if self.max_batch_size is not None:
                chunks = max(1, math.ceil(int(shares.max()) / self.max_batch_size))
            pieces = torch.tensor_split(mine, chunks)
            for piece in pieces[:-1]:
                self.optimizer.signal_skip_step(do_skip=True)
                yield piece.tolist()
            self.optimizer.signal_skip_step(do_skip=False)
            yield pieces[-1].tolist()


def _check_base_loader(base: DataLoader) -> None:
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
    sampler_name = type(base.sampler).__name__
    if sampler_name not in ("RandomSampler", "SequentialSampler"):
        logger.info(
            "DP-SGD: the training sampler %s is replaced by Poisson sampling.", sampler_name
        )


def _loader_options(base: DataLoader) -> dict[str, Any]:
    return {
        "num_workers": base.num_workers,
        "pin_memory": base.pin_memory,
        "timeout": base.timeout,
        "worker_init_fn": base.worker_init_fn,
        "multiprocessing_context": base.multiprocessing_context,
        "prefetch_factor": base.prefetch_factor,
        "persistent_workers": base.persistent_workers,
    }


class PoissonTrainLoader:
    """Training batches of one DP-SGD run: Poisson-sampled, optionally split into physical batches.

    Only the dataset, collate function and worker settings of the model's own training loader
    carry over. Its sampler is dropped, because Poisson sampling must replace any sampler
    (weighted, shuffled or distributed) for the accounting to hold.

    In one process the batches come from Opacus' ``DPDataLoader``; with
    ``max_physical_batch_size`` they are split by Opacus' ``BatchSplittingSampler`` (the
    sampler behind ``BatchMemoryManager``). Under DDP they come from
    :class:`DistributedPoissonBatchSampler` with Opacus' empty-batch collate function.

    Lightning re-creates plain ``DataLoader`` objects to insert its own samplers, which would
    undo Poisson sampling, so this wrapper is deliberately not a ``DataLoader`` subclass.
    With physical batches the number of batches per epoch is random, so ``len()`` raises
    ``TypeError`` and Lightning runs each epoch until the data ends.

    Args:
        base: The model's own training loader.
        sample_rate: Inclusion probability of each example in each logical batch.
        optimizer: The DP optimizer that consumes the batches.
        generator: Generator of the sampling (seeded identically in every DDP process).
        rank: This process' rank.
        world_size: Number of processes.
        max_physical_batch_size: Largest batch to put through the model at once, or ``None``.

    Raises:
        TypeError: if ``base`` is not a ``DataLoader`` over a map-style dataset.
    """

    def __init__(
        self,
        base: DataLoader,
        sample_rate: float,
        optimizer: DPOptimizer,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        max_physical_batch_size: int | None = None,
    ) -> None:
        _check_base_loader(base)
        self.sample_rate = sample_rate
        self.optimizer = optimizer
        self.max_physical_batch_size = max_physical_batch_size
        self.poisson_loader = DPDataLoader(
            dataset=base.dataset,
            sample_rate=sample_rate,
            collate_fn=base.collate_fn,
            generator=generator,
            **_loader_options(base),
        )
        if world_size > 1:
            self.batch_sampler: Sampler = DistributedPoissonBatchSampler(
                num_samples=len(base.dataset),
                sample_rate=sample_rate,
                steps=len(self.poisson_loader),
                rank=rank,
                world_size=world_size,
                generator=generator,
                optimizer=optimizer,
                max_batch_size=max_physical_batch_size,
            )
            self.loader = DataLoader(
                base.dataset,
                batch_sampler=self.batch_sampler,
                collate_fn=self.poisson_loader.collate_fn,
                **_loader_options(base),
            )
        elif max_physical_batch_size is not None:
            self.loader = wrap_data_loader(
                data_loader=self.poisson_loader,
                max_batch_size=max_physical_batch_size,
                optimizer=optimizer,
            )
            self.batch_sampler = self.loader.batch_sampler
        else:
            self.loader = self.poisson_loader
            self.batch_sampler = self.loader.batch_sampler

    @property
    def dataset(self) -> Any:
        """The training dataset."""
        return self.poisson_loader.dataset

    @property
    def steps_per_epoch(self) -> int:
        """Logical batches (private steps) per epoch."""
        return len(self.poisson_loader)

    def __len__(self) -> int:
        if self.max_physical_batch_size is not None:
            raise TypeError("The number of physical batches per epoch is random.")
        return self.steps_per_epoch

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
