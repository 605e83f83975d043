"""DIFF2 with the bias-variance reduced local SGD subroutine (DIFF2-BVR-L-SGD).

Murata and Suzuki, "DIFF2: Differential Private Optimization via Gradient Differences for
Nonconvex Distributed Learning" (ICML 2023), pair DIFF2's private gradient estimate with
gradient descent (:class:`zoo.privacy.diff2.Diff2`) and, by their abstract, with a more
computation- and communication-efficient subroutine. This module builds that subroutine
from the estimator of Murata and Suzuki, "Bias-Variance Reduced Local SGD for Less
Heterogeneous Federated Learning" (ICML 2021). The routine below is this project's
reading of the two papers. It has not been checked against the algorithm box of the
DIFF2 paper.

Round ``r`` runs DIFF2's restart or difference messages exactly as DIFF2-GD does, and the
server forms the estimate ``v_r``. Then, in place of ``x_(r+1) = x_r - eta v_r``:

1. Every worker starts from the server's ``x_0 = x_r`` and ``v_0 = v_r``.
2. For ``k = 0, ..., K - 1`` it steps ``x_(k+1) = x_k - eta v_k``. Between steps
   (``k + 1 < K``) it updates a SARAH-style local estimate
   ``v_(k+1) = v_k + (S + N(0, (sigma3 C3_k)^2 I)) / b``. ``S`` is the sum, over a Poisson
   sample of the worker's shard at rate ``q``, of the per-example gradient differences
   ``grad l(x_(k+1); z) - grad l(x_k; z)``, each clipped to norm ``C3_k``. ``b = q n_p`` is
   the expected minibatch size on a shard of ``n_p`` records.
3. The server sets ``x_(r+1)`` to the mean of the workers' ``x_K``, weighted by shard size.

Steps 1 and 2 follow the BVR-L-SGD estimator: a local recursion of gradient differences
that starts from the global estimate, meant to reduce the bias and variance of plain
local SGD. The clipping, the noise on each worker, Poisson sampling and the clip rule are
this project's choices. They make each local update a subsampled Gaussian mechanism that
:mod:`zoo.privacy.diff2_accounting` composes. ``C3_k`` is a fixed public radius or
``L * ||x_(k+1) - x_k||``, which depends only on public settings and already-private
values. Step 3 is a reading as well: the BVR-L-SGD abstract suggests picking one
worker's local model at random in place of the mean. With ``K = 1`` no local update runs
and the routine is DIFF2-GD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from zoo.privacy.diff2 import Diff2, LossFn, WorkerMessage, gaussian_noise
from zoo.privacy.diff2_accounting import LocalStepsPrivacy, check_local_steps_privacy

#: Names of the subroutines that :class:`zoo.privacy.diff2_module.Diff2Classifier` accepts.
SUBROUTINES = ("gd", "bvr-l-sgd")


def local_round_generator(noise_seed: int, worker: int, round_index: int) -> torch.Generator:
    """Return the CPU generator of a worker's local steps in one round.

    It draws the Poisson samples and the noise of the local steps. Its seed comes from
    ``(noise_seed, worker, round_index, 1)``, a different stream from the messages'
    :func:`~zoo.privacy.diff2.round_generator`.
    """
    sequence = np.random.SeedSequence([noise_seed, worker, round_index, 1])
    seed = int(sequence.generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


@dataclass
class LocalRun:
    """Final iterate of one worker's local steps and what each private update used."""

    params: Tensor
    #: Clip radius ``C3_k`` of every local update.
    clips: list[float] = field(default_factory=list)
    #: Records that the Poisson sample drew for every local update.
    batch_sizes: list[int] = field(default_factory=list)


def check_local_clip_setting(name: str, value: float | None) -> None:
    """Raise ValueError unless ``value`` is None or a finite number > 0.

    ``name`` is ``clip_local`` or the smoothness ``L`` of the local clip. Zero would clip
    every local gradient difference to nothing, so the local updates would add only noise.
    """
    if value is not None and not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        raise ValueError(
            f"{name} must be a finite number > 0 or None, got {value!r}. Set it positive, "
            "or to None to use the other local clip."
        )


class Diff2BVRLocalSGD(Diff2):
    """DIFF2 with the BVR-L-SGD subroutine: private local SARAH steps between messages.

    The messages, the estimate ``v`` and their privacy are those of :class:`Diff2`. After
    :meth:`server_update` folds the messages into ``v_r``, every worker calls
    :meth:`local_iterate` on its shard, and the sum over workers of ``n_p * x_K`` goes to
    :meth:`apply_local_iterates`, which loads the weighted mean as the next iterate.

    Args:
        model: The network to train, as in :class:`Diff2`.
        loss_fn: Loss summed over the batch.
        local_steps: ``K`` >= 1, local steps per round.
        local_sample_rate: ``q`` in (0, 1], Poisson sampling rate of the local minibatches.
        noise_multiplier_local: ``sigma3``. A local update's noise std is ``sigma3 * C3``.
        clip_local: Fixed ``C3`` > 0. Give this or ``local_smoothness``, not both.
        local_smoothness: ``L`` > 0 in ``C3_k = L * ||x_(k+1) - x_k||``.
        **diff2_arguments: Keyword arguments of :class:`Diff2` (``lr``, ``restart_interval``,
            ``clip_restart``, the multipliers, ``clip_difference``, ``smoothness``,
            ``chunk_size``). ``lr`` is also the local step size.

    Raises:
        ValueError: if a setting is out of range, or both or neither of ``clip_local`` and
            ``local_smoothness`` are given while ``K > 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        local_steps: int,
        local_sample_rate: float,
        noise_multiplier_local: float,
        clip_local: float | None = None,
        local_smoothness: float | None = None,
        **diff2_arguments: float | int | None,
    ) -> None:
        super().__init__(model, loss_fn, **diff2_arguments)
        self.local_privacy = LocalStepsPrivacy(
            local_steps, local_sample_rate, noise_multiplier_local
        )
        check_local_steps_privacy(self.local_privacy)
        for name, value in {"clip_local": clip_local, "local_smoothness": local_smoothness}.items():
            check_local_clip_setting(name, value)
        if local_steps > 1 and (clip_local is None) == (local_smoothness is None):
            raise ValueError(
                "Give exactly one of clip_local (a fixed C3) and local_smoothness (L, for "
                f"C3 = L * ||x_(k+1) - x_k||); got clip_local={clip_local!r}, "
                f"local_smoothness={local_smoothness!r}."
            )
        self.local_steps = local_steps
        self.local_sample_rate = float(local_sample_rate)
        self.noise_multiplier_local = float(noise_multiplier_local)
        self.clip_local = clip_local
        self.local_smoothness = local_smoothness

    def check_local_sample_size(self, num_records: int) -> None:
        """Raise ValueError if a shard of ``num_records`` expects less than one local record.

        A local update divides its clipped sum and noise by the expected sample size
        ``q * n_p``, so below one record it enlarges the noise instead of averaging it.
        With ``K = 1`` no local update runs and any shard passes.
        """
        if self.local_steps == 1:
            return
        expected = self.local_sample_rate * num_records
        if expected < 1.0:
            raise ValueError(
                f"local_sample_rate={self.local_sample_rate} expects {expected:.3g} records "
                f"per local update on a shard of {num_records} records, fewer than one. Use "
                f"local_sample_rate >= 1 / {num_records} = {1.0 / max(num_records, 1):.3g}, "
                "or fewer processes."
            )

    def server_update(self, message_sum: Tensor, num_records: int, restart: bool) -> Tensor:
        """Fold the summed messages into ``v_r`` and leave the step to the local routine.

        The model keeps ``x_r`` until :meth:`apply_local_iterates` loads ``x_(r+1)``.
        The round index advances here, as in :class:`Diff2`.
        """
        self._fold_messages(message_sum, num_records, restart)
        self.round_index += 1
        assert self.estimate is not None
        return self.estimate

    def local_clip(self, params: Tensor, previous: Tensor) -> float:
        """Return ``C3_k`` from public settings and the (already private) local iterates."""
        if self.clip_local is not None:
            return float(self.clip_local)
        assert self.local_smoothness is not None
        return float(self.local_smoothness * (params - previous).norm())

    def local_iterate(
        self, inputs: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> LocalRun:
        """Run this worker's ``K`` local steps from the model's ``x_r`` and the server's ``v_r``.

        Args:
            inputs: The worker's records, all of them (its shard).
            targets: Their targets, in the form ``loss_fn`` expects.
            generator: Source of the Poisson samples and the noise, from
                :func:`local_round_generator`.

        Returns:
            The worker's final iterate ``x_K`` and the clips and sample sizes it used.

        Raises:
            RuntimeError: if :meth:`server_update` has not formed ``v_r`` yet.
            ValueError: if ``q * len(inputs) < 1``, see :meth:`check_local_sample_size`.
        """
        if self.estimate is None:
            raise RuntimeError("local_iterate needs the estimate v_r. Call server_update first.")
        self.check_local_sample_size(len(inputs))
        params = self.flat.flatten(self.model)
        estimate = self.estimate.clone()
        expected_batch_size = self.local_sample_rate * len(inputs)
        run = LocalRun(params=params)
        previous, params = params, params - self.lr * estimate
        for _ in range(self.local_steps - 1):
            estimate = estimate + self._local_update(
                params, previous, inputs, targets, generator, expected_batch_size, run
            )
            previous, params = params, params - self.lr * estimate
        run.params = params
        return run

    def _local_update(
        self,
        params: Tensor,
        previous: Tensor,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        expected_batch_size: float,
        run: LocalRun,
    ) -> Tensor:
        # Poisson sampling: every record joins independently with probability q, as the
        # accountant's subsampled Gaussian mechanism assumes. An empty sample still gets noise.
        draws = torch.rand(len(inputs), generator=generator, dtype=torch.float64)
        chosen = (draws < self.local_sample_rate).nonzero().squeeze(1).to(inputs.device)
        clip = self.local_clip(params, previous)
        if clip == 0.0 or len(chosen) == 0:
            total = torch.zeros_like(params)
        else:
            total = self.gradients.clipped_difference_sum(
                params, previous, inputs[chosen], targets[chosen], clip
            )
        noise = gaussian_noise(self.flat, self.noise_multiplier_local * clip, generator, total)
        run.clips.append(clip)
        run.batch_sizes.append(len(chosen))
        return (total + noise) / expected_batch_size

    def apply_local_iterates(self, weighted_iterate_sum: Tensor, num_records: int) -> Tensor:
        """Load ``x_(r+1) = (sum over workers of n_p * x_K) / N`` into the model.

        Args:
            weighted_iterate_sum: Sum over workers of their record count times their ``x_K``.
            num_records: Total number of records over all workers, ``N``.

        Returns:
            The new iterate ``x_(r+1)``.
        """
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}.")
        params = weighted_iterate_sum / num_records
        self.flat.load_into(self.model, params)
        return params

    def simulate_round(
        self,
        shards: Sequence[tuple[Tensor, Tensor]],
        num_records: int,
        noise_seed: int,
    ) -> tuple[WorkerMessage, Tensor]:
        """Run one round with all workers in this process, messages and local steps."""
        round_index = self.round_index
        first, estimate = super().simulate_round(shards, num_records, noise_seed)
        weighted_sum: Tensor | None = None
        for worker, (inputs, targets) in enumerate(shards):
            generator = local_round_generator(noise_seed, worker, round_index)
            weighted = self.local_iterate(inputs, targets, generator).params * len(inputs)
            weighted_sum = weighted if weighted_sum is None else weighted_sum + weighted
        assert weighted_sum is not None
        self.apply_local_iterates(weighted_sum, num_records)
        return first, estimate
