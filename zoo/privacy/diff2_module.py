"""Lightning module that trains a binary classifier with DIFF2, one worker per process.

Each DDP process is one DIFF2 worker with its own shard of the training data (the
shard that Lightning's ``DistributedSampler`` gives it from a full-batch loader). That
sampler shuffles with the epoch, so every round splits the records into new disjoint
shards. In every round each worker computes its privatised message, the processes sum
the messages with ``torch.distributed.all_reduce`` (gloo on CPU, NCCL on GPU), and every
process applies the same server update. With the BVR-L-SGD subroutine each worker then runs its private local
steps, and the processes sum the record-weighted final iterates with ``all_reduce`` as
well. With one process there is one worker. Each training step is one round, so an epoch
is one round when the loader yields one full batch.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy

from zoo.callbacks.figures import log_figure
from zoo.privacy.diff2 import Diff2, check_diff2_arguments, round_generator
from zoo.privacy.diff2_accounting import (
    DEFAULT_LOCAL_SHARE,
    LocalStepsPrivacy,
    calibrate_noise,
    calibrate_noise_with_local_steps,
    check_local_steps_privacy,
    diff2_epsilon,
)
from zoo.privacy.diff2_local import (
    SUBROUTINES,
    Diff2BVRLocalSGD,
    check_local_clip_setting,
    local_round_generator,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: A run warns once its estimate norm exceeds this many times the scale of a restart
#: round's estimate, ``C1 * (1 + sigma1 * sqrt(d) / N)``.
ESTIMATE_DIVERGENCE_FACTOR = 100.0
#: A run warns once its validation loss exceeds this many times ``log(2)``, the loss of a
#: constant 50 % prediction.
LOSS_DIVERGENCE_FACTOR = 10.0

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def build_mlp(num_features: int, hidden_sizes: list[int], activation: str) -> nn.Sequential:
    """Return an MLP ``num_features -> hidden_sizes... -> 1`` that outputs one logit.

    Raises:
        ValueError: if a size is below 1 or ``activation`` is not in :data:`ACTIVATIONS`.
    """
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}.")
    if any(size < 1 for size in hidden_sizes):
        raise ValueError(f"hidden_sizes must all be >= 1, got {hidden_sizes}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    layers: list[nn.Module] = []
    width = num_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def summed_logistic_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Return the binary cross-entropy of ``logits [B, 1]`` against 0/1 ``targets [B]``, summed."""
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets, reduction="sum")


def rounds_figure(history: list[dict[str, float]]) -> Figure:
    """Plot the clip radius and ``||v||`` (log scale) and the spent epsilon per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [record["round"] for record in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.semilogy(rounds, [record["clip"] for record in history], ".-", label="clip radius")
    left.semilogy(rounds, [record["estimate_norm"] for record in history], ".-", label="||v||")
    restarts = [record["round"] for record in history if record["restart"]]
    for index, round_index in enumerate(restarts):
        left.axvline(round_index, color="grey", lw=0.5, label="restart" if index == 0 else None)
    left.set_xlabel("round")
    left.legend()
    right.plot(rounds, [record["epsilon"] for record in history], ".-")
    right.set_xlabel("round")
    right.set_ylabel("epsilon spent")
    figure.tight_layout()
    return figure


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes when a process group is running."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class Diff2Classifier(pl.LightningModule):
    """Binary classifier (an MLP on tabular features) trained privately with DIFF2.

    ``subroutine`` chooses how the server's estimate ``v`` moves the iterate: ``"gd"``
    (DIFF2-GD, one step ``x <- x - lr * v``) or ``"bvr-l-sgd"`` (``local_steps`` private
    local SARAH steps per worker, see :mod:`zoo.privacy.diff2_local`).
    ``restart_interval=1`` with ``"gd"`` gives DP gradient descent (DP-GD), the baseline.
    The data must come as one full batch per process and step, for example
    ``AdultDataModule(batch_size=-1)``. Training stops after ``rounds`` rounds, so set
    ``trainer.max_epochs`` to at least ``rounds``.

    Privacy: with ``target_epsilon`` set, the noise multipliers are calibrated so that
    ``rounds`` rounds spend exactly ``(target_epsilon, delta)`` under add/remove-one
    adjacency, as :mod:`zoo.privacy.diff2_accounting` explains. Without it, both
    multipliers must be given. The spent epsilon is logged as ``privacy/epsilon`` after every round.

    NOTE: only the CPU path (gloo) is tested. On GPUs the messages are summed with NCCL
    and the noise is drawn on the CPU and moved, but no GPU run has checked this.

    NOTE: the noise comes from ``torch.Generator`` (Mersenne Twister), which is not a
    cryptographically secure generator, and a fixed ``noise_seed`` makes the noise
    reproducible by anyone who knows it. Leave ``noise_seed=None`` for a private release.

    Args:
        num_features: Input width (107 for the one-hot encoded Adult data).
        hidden_sizes: Widths of the hidden layers; ``None`` means ``[10]``.
        activation: Hidden activation, one of ``softplus``, ``tanh``, ``sigmoid``, ``gelu``,
            ``relu``. A smooth one suits the smoothness-based difference clip.
        rounds: Rounds ``R`` that the privacy budget covers; training stops after them.
        restart_interval: ``T``; every ``T``-th round sends a full clipped gradient.
        lr: Step size of ``x <- x - lr * v``.
        clip_restart: ``C1``, per-example gradient clip radius of restart rounds.
        clip_difference: Fixed ``C2`` > 0 of difference rounds; give this or ``smoothness``.
        smoothness: ``L`` > 0 in the difference clip ``C2_r = L * ||x_r - x_(r-1)||``.
        target_epsilon: Privacy budget for ``rounds`` rounds; ``None`` to set the
            multipliers by hand.
        delta: Target delta, much smaller than one over the number of training records.
        noise_multiplier_restart: ``sigma1`` when ``target_epsilon`` is None.
        noise_multiplier_difference: ``sigma2`` when ``target_epsilon`` is None.
        restart_share: Share of the Rényi-DP budget spent on restart rounds, in (0, 1).
        noise_seed: Base seed of the noise (per process and round); ``None`` draws a fresh
            secret seed in every process.
        chunk_size: Examples per vectorised per-example gradient call.
        subroutine: ``"gd"`` (DIFF2-GD) or ``"bvr-l-sgd"`` (DIFF2-BVR-L-SGD). The settings
            below apply only to ``"bvr-l-sgd"``.
        local_steps: ``K``, local steps per round. ``K - 1`` of them are private updates of
            the local estimate. ``K = 1`` gives the iterates of DIFF2-GD.
        local_sample_rate: ``q``, Poisson sampling rate of a local minibatch on a worker's
            shard. The expected minibatch has ``q * records of the worker`` records. If that
            is below one, the first training step raises ValueError.
        clip_local: Fixed ``C3`` > 0, per-example clip radius of local updates. ``None``
            uses ``C3_k = smoothness * ||x_(k+1) - x_k||``.
        noise_multiplier_local: ``sigma3`` when ``target_epsilon`` is None.
        local_share: Share of the Rényi DP that the local steps get at the order that sets
            epsilon, in (0, 1), as in
            :func:`~zoo.privacy.diff2_accounting.calibrate_noise_with_local_steps`.
    """

    def __init__(
        self,
        num_features: int = 107,
        hidden_sizes: list[int] | None = None,
        activation: str = "softplus",
        rounds: int = 100,
        restart_interval: int = 10,
        lr: float = 1.0,
        clip_restart: float = 1.0,
        clip_difference: float | None = None,
        smoothness: float | None = 1.0,
        target_epsilon: float | None = 1.0,
        delta: float = 1e-5,
        noise_multiplier_restart: float | None = None,
        noise_multiplier_difference: float | None = None,
        restart_share: float = 0.5,
        noise_seed: int | None = None,
        chunk_size: int = 4096,
        subroutine: str = "gd",
        local_steps: int = 3,
        local_sample_rate: float = 0.05,
        clip_local: float | None = None,
        noise_multiplier_local: float | None = None,
        local_share: float = DEFAULT_LOCAL_SHARE,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if hidden_sizes is None:
            hidden_sizes = [10]
        if subroutine not in SUBROUTINES:
            raise ValueError(f"Unknown subroutine {subroutine!r}; choose one of {SUBROUTINES}.")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {rounds!r}.")
        if noise_seed is not None and (not isinstance(noise_seed, int) or noise_seed < 0):
            raise ValueError(f"noise_seed must be an int >= 0 or None, got {noise_seed!r}.")
        sigma_restart, sigma_difference, sigma_local = self._noise_multipliers()
        check_diff2_arguments(
            lr=lr,
            restart_interval=restart_interval,
            clip_restart=clip_restart,
            noise_multiplier_restart=sigma_restart,
            noise_multiplier_difference=sigma_difference,
            clip_difference=clip_difference,
            smoothness=smoothness,
        )
        self.automatic_optimization = False
        self.net = build_mlp(num_features, list(hidden_sizes), activation).double()
        diff2_arguments = {
            "lr": lr,
            "restart_interval": restart_interval,
            "clip_restart": clip_restart,
            "noise_multiplier_restart": sigma_restart,
            "noise_multiplier_difference": sigma_difference,
            "clip_difference": clip_difference if restart_interval > 1 else None,
            "smoothness": smoothness if restart_interval > 1 else None,
            "chunk_size": chunk_size,
        }
        self.algorithm: Diff2 | Diff2BVRLocalSGD
        if subroutine == "gd":
            self.algorithm = Diff2(self.net, summed_logistic_loss, **diff2_arguments)
        else:
            uses_local_clip = local_steps > 1
            self.algorithm = Diff2BVRLocalSGD(
                self.net,
                summed_logistic_loss,
                local_steps=local_steps,
                local_sample_rate=local_sample_rate,
                noise_multiplier_local=sigma_local,
                clip_local=clip_local if uses_local_clip else None,
                local_smoothness=smoothness if uses_local_clip and clip_local is None else None,
                **diff2_arguments,
            )
        self.val_accuracy = BinaryAccuracy()
        self.test_accuracy = BinaryAccuracy()
        self._noise_base_seed: int | None = None
        #: Per-round records of this run (not of resumed earlier runs), for the figure.
        self._history: list[dict[str, float]] = []
        #: Kinds of divergence warning already given in this run, to warn once per kind.
        self._divergence_warnings: set[str] = set()

    @property
    def uses_local_steps(self) -> bool:
        """Whether the BVR-L-SGD subroutine runs private local updates (``K > 1``)."""
        return self.hparams.subroutine == "bvr-l-sgd" and self.hparams.local_steps > 1

    def _noise_multipliers(self) -> tuple[float, float, float]:
        """Return ``(sigma1, sigma2, sigma3)``, with ``sigma3 = 0`` when no local update runs."""
        hparams = self.hparams
        # The local settings are checked with "gd" too, so that a typo there still raises.
        local_privacy: LocalStepsPrivacy | None = LocalStepsPrivacy(
            hparams.local_steps,
            hparams.local_sample_rate,
            hparams.noise_multiplier_local or 0.0,
        )
        check_local_steps_privacy(local_privacy)
        check_local_clip_setting("clip_local", hparams.clip_local)
        share = hparams.local_share
        if not (isinstance(share, (int, float)) and 0.0 < share < 1.0):
            raise ValueError(f"local_share must be in (0, 1), got {share!r}.")
        if hparams.subroutine == "gd":
            local_privacy = None
        elif self.uses_local_steps and hparams.clip_local is None and hparams.smoothness is None:
            raise ValueError(
                "subroutine='bvr-l-sgd' with local_steps > 1 needs clip_local (a fixed "
                "C3) or smoothness (for C3 = L * ||x_(k+1) - x_k||), but both are None."
            )
        if hparams.target_epsilon is not None:
            explicit_multipliers = (
                hparams.noise_multiplier_restart,
                hparams.noise_multiplier_difference,
                hparams.noise_multiplier_local,
            )
            if any(value is not None for value in explicit_multipliers):
                raise ValueError(
                    "Give either target_epsilon or the noise multipliers, not both; got "
                    f"target_epsilon={hparams.target_epsilon}, noise_multiplier_restart="
                    f"{hparams.noise_multiplier_restart}, noise_multiplier_difference="
                    f"{hparams.noise_multiplier_difference}, noise_multiplier_local="
                    f"{hparams.noise_multiplier_local}."
                )
            if local_privacy is not None:
                return calibrate_noise_with_local_steps(
                    hparams.target_epsilon,
                    hparams.delta,
                    hparams.rounds,
                    hparams.restart_interval,
                    local_privacy,
                    hparams.restart_share,
                    hparams.local_share,
                )
            sigma_restart, sigma_difference = calibrate_noise(
                hparams.target_epsilon,
                hparams.delta,
                hparams.rounds,
                hparams.restart_interval,
                hparams.restart_share,
            )
            return sigma_restart, sigma_difference, 0.0
        if hparams.noise_multiplier_restart is None:
            raise ValueError(
                "Set target_epsilon (for example 1.0) or noise_multiplier_restart; both are "
                "None, which would train without privacy."
            )
        difference = hparams.noise_multiplier_difference
        if difference is None:
            if hparams.restart_interval > 1:
                raise ValueError(
                    "noise_multiplier_difference is None but restart_interval="
                    f"{hparams.restart_interval} > 1 has difference rounds; set it, or set "
                    "target_epsilon instead."
                )
            difference = 0.0
        local = hparams.noise_multiplier_local
        if self.uses_local_steps and local is None:
            raise ValueError(
                f"noise_multiplier_local is None but subroutine='bvr-l-sgd' with local_steps="
                f"{hparams.local_steps} > 1 runs private local updates; set it, or set "
                "target_epsilon instead."
            )
        zero_noise = [
            name
            for name, value, used in (
                ("noise_multiplier_restart", hparams.noise_multiplier_restart, True),
                ("noise_multiplier_difference", difference, hparams.restart_interval > 1),
                ("noise_multiplier_local", local, self.uses_local_steps),
            )
            if used and value == 0
        ]
        if zero_noise:
            raise ValueError(
                f"{' and '.join(zero_noise)} is 0, which would train without privacy "
                "(infinite epsilon). Set a positive noise multiplier, or set target_epsilon."
            )
        local_multiplier = float(local) if self.uses_local_steps and local is not None else 0.0
        return float(hparams.noise_multiplier_restart), float(difference), local_multiplier

    @property
    def noise_multipliers(self) -> tuple[float, float]:
        """``(sigma1, sigma2)`` in use."""
        return (
            self.algorithm.noise_multiplier_restart,
            self.algorithm.noise_multiplier_difference,
        )

    @property
    def local_privacy(self) -> LocalStepsPrivacy | None:
        """``K``, ``q`` and ``sigma3`` of the BVR-L-SGD local steps; None for DIFF2-GD."""
        if not isinstance(self.algorithm, Diff2BVRLocalSGD):
            return None
        return self.algorithm.local_privacy

    def privacy_spent(self, rounds: int | None = None) -> dict[str, float | int | str]:
        """Return ``{"epsilon", "delta", "rounds", ...}`` after ``rounds`` rounds.

        With the BVR-L-SGD subroutine the dictionary also has ``subroutine``,
        ``local_steps``, ``local_sample_rate`` and ``noise_multiplier_local``.

        Args:
            rounds: Rounds to account for; ``None`` means the rounds run so far.
        """
        done = self.algorithm.round_index if rounds is None else rounds
        sigma_restart, sigma_difference = self.noise_multipliers
        local = self.local_privacy
        epsilon = diff2_epsilon(
            done,
            self.hparams.restart_interval,
            sigma_restart,
            sigma_difference,
            self.hparams.delta,
            local,
        )
        spent: dict[str, float | int | str] = {
            "epsilon": epsilon,
            "delta": float(self.hparams.delta),
            "rounds": int(done),
            "restart_interval": int(self.hparams.restart_interval),
            "noise_multiplier_restart": float(sigma_restart),
            "noise_multiplier_difference": float(sigma_difference),
            "accountant": "rdp",
        }
        if local is not None:
            spent["subroutine"] = "bvr-l-sgd"
            spent["local_steps"] = int(local.local_steps)
            spent["local_sample_rate"] = float(local.sample_rate)
            spent["noise_multiplier_local"] = float(local.noise_multiplier)
        return spent

    def forward(self, features: Tensor) -> Tensor:
        """Return the logits ``[B]`` for features ``[B, num_features]``."""
        return self.net(features.to(torch.float64)).squeeze(-1)

    def _check_batch(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.hparams.num_features:
            raise ValueError(
                f"Expected features of shape [B, {self.hparams.num_features}], got "
                f"{tuple(features.shape)}. Set model.num_features to the data's width."
            )

    def on_train_start(self) -> None:
        """Check that each step receives the process's whole shard, and seed the noise."""
        batches = self.trainer.num_training_batches
        if batches != 1:
            raise ValueError(
                f"DIFF2 needs one full batch per process and round, but the training loader "
                f"yields {batches} batches per epoch. Use a full-batch loader, for example "
                "AdultDataModule(batch_size=-1)."
            )
        max_epochs = self.trainer.max_epochs
        remaining = self.hparams.rounds - self.algorithm.round_index
        if max_epochs is not None and 0 <= max_epochs - self.current_epoch < remaining:
            rank_zero_warn(
                f"trainer.max_epochs={max_epochs} stops before the {self.hparams.rounds} "
                "rounds that the noise was calibrated for; the run will spend less than "
                "its privacy budget and may not converge."
            )
        seed = self.hparams.noise_seed
        self._noise_base_seed = secrets.randbits(63) if seed is None else int(seed)
        # A restored server state arrives on the CPU; the parameters may be on an accelerator.
        state = self.algorithm
        if state.estimate is not None:
            state.estimate = state.estimate.to(self.device)
        if state.previous_params is not None:
            state.previous_params = state.previous_params.to(self.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Run one DIFF2 round: local message, sum over processes, server update."""
        if self.algorithm.round_index >= self.hparams.rounds:
            self.trainer.should_stop = True
            return None
        features, labels = batch
        self._check_batch(features)
        inputs = features.to(torch.float64)
        targets = labels.to(torch.float64)
        round_index = self.algorithm.round_index
        assert self._noise_base_seed is not None
        if isinstance(self.algorithm, Diff2BVRLocalSGD):
            # Checked before the round, so that a rejected shard leaves the state unchanged.
            self.algorithm.check_local_sample_size(len(inputs))
        generator = round_generator(self._noise_base_seed, self.global_rank, round_index)
        message = self.algorithm.worker_message(inputs, targets, generator)

        total = all_reduce_sum(message.vector.clone())
        counts = torch.tensor([message.num_records, 1], dtype=torch.float64, device=total.device)
        all_reduce_sum(counts)
        num_records, num_workers = int(counts[0].item()), int(counts[1].item())
        estimate = self.algorithm.server_update(total, num_records, message.restart)
        if isinstance(self.algorithm, Diff2BVRLocalSGD):
            self._run_local_steps(inputs, targets, round_index, num_records)

        self._warn_if_estimate_diverges(float(estimate.norm()), estimate.numel(), num_records)
        epsilon = self.privacy_spent()["epsilon"]
        self.log("privacy/epsilon", epsilon, on_step=False, on_epoch=True)
        self.log("train/estimate_norm", float(estimate.norm()), on_step=False, on_epoch=True)
        self.log("train/clip", message.clip, on_step=False, on_epoch=True)
        self.log("train/restart", float(message.restart), on_step=False, on_epoch=True)
        self.log("train/records", float(num_records), on_step=False, on_epoch=True)
        self.log("train/workers", float(num_workers), on_step=False, on_epoch=True)
        self._history.append(
            {
                "round": float(round_index),
                "epsilon": epsilon,
                "clip": message.clip,
                "estimate_norm": float(estimate.norm()),
                "restart": float(message.restart),
            }
        )
        if self.algorithm.round_index >= self.hparams.rounds:
            self.trainer.should_stop = True
        return None

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._divergence_warnings:
            self._divergence_warnings.add(kind)
            rank_zero_warn(message)

    def _warn_if_estimate_diverges(
        self, estimate_norm: float, num_parameters: int, num_records: int
    ) -> None:
        """Warn once if ``||v||`` is non-finite or far above a restart round's scale.

        A restart round's estimate is a mean of gradients clipped to ``C1`` plus noise of
        norm about ``sigma1 * C1 * sqrt(d) / N``. An estimate far above that usually means
        that noise feeds back into the clip radii and the run diverges.
        """
        clip = self.hparams.clip_restart
        sigma_restart = self.algorithm.noise_multiplier_restart
        scale = clip * (1.0 + sigma_restart * math.sqrt(num_parameters) / num_records)
        limit = ESTIMATE_DIVERGENCE_FACTOR * scale
        if math.isfinite(estimate_norm) and estimate_norm <= limit:
            return
        size = "is not finite" if not math.isfinite(estimate_norm) else f"exceeds {limit:.4g}"
        self._warn_once(
            "estimate",
            f"DIFF2 is diverging: in round {self.algorithm.round_index - 1} the estimate "
            f"norm ||v|| = {estimate_norm:.4g} {size}, {ESTIMATE_DIVERGENCE_FACTOR:g} times "
            "the scale of a restart round's estimate. A smoothness-based clip grows with "
            "noisy steps and lets in more noise. Try a larger target_epsilon or "
            "local_sample_rate, a smaller lr or smoothness, or fewer local_steps.",
        )

    def _run_local_steps(
        self, inputs: Tensor, targets: Tensor, round_index: int, num_records: int
    ) -> None:
        """Run this worker's BVR-L-SGD steps and load the record-weighted mean iterate."""
        assert isinstance(self.algorithm, Diff2BVRLocalSGD)
        assert self._noise_base_seed is not None
        generator = local_round_generator(self._noise_base_seed, self.global_rank, round_index)
        run = self.algorithm.local_iterate(inputs, targets, generator)
        weighted_sum = all_reduce_sum(run.params * len(inputs))
        self.algorithm.apply_local_iterates(weighted_sum, num_records)
        if run.clips:
            self.log(
                "train/local_clip", sum(run.clips) / len(run.clips), on_step=False, on_epoch=True
            )
            mean_batch = sum(run.batch_sizes) / len(run.batch_sizes)
            self.log("train/local_batch_size", float(mean_batch), on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        """Log a figure of the clip radius, ``||v||`` and spent epsilon per round."""
        if self._history:
            log_figure(self.trainer, "diff2/rounds", rounds_figure(self._history))

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: BinaryAccuracy) -> None:
        features, labels = batch
        self._check_batch(features)
        logits = self(features)
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(torch.float64))
        limit = LOSS_DIVERGENCE_FACTOR * math.log(2.0)
        value = loss.item()
        if not (math.isfinite(value) and value <= limit):
            self._warn_once(
                f"{stage} loss",
                f"The {stage} loss {value:.3g} is not finite or exceeds {limit:.3g} "
                f"({LOSS_DIVERGENCE_FACTOR:g} times that of a constant 50 % prediction), so "
                "training has probably diverged. See the warning about ||v||, if any.",
            )
        metric(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(labels))
        self.log(f"{stage}/accuracy", metric, batch_size=len(labels))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log validation loss and accuracy."""
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log test loss and accuracy."""
        self._evaluate(batch, "test", self.test_accuracy)

    def predict_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> Tensor:
        """Return the probability of the positive class for each example."""
        features = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.sigmoid(self(features))

    def configure_optimizers(self) -> None:
        """Return no optimizer: :class:`~zoo.privacy.diff2.Diff2` updates the parameters."""
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the server state (round, estimate, previous iterate) for resuming."""
        state = self.algorithm
        checkpoint["diff2"] = {
            "round_index": state.round_index,
            "estimate": None if state.estimate is None else state.estimate.clone(),
            "previous_params": (
                None if state.previous_params is None else state.previous_params.clone()
            ),
            "privacy": self.privacy_spent(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the server state saved by :meth:`on_save_checkpoint`."""
        saved = checkpoint.get("diff2")
        if saved is None:
            return
        self._check_resumed_noise(saved["privacy"])
        self.algorithm.round_index = int(saved["round_index"])
        self.algorithm.estimate = saved["estimate"]
        self.algorithm.previous_params = saved["previous_params"]

    def _check_resumed_noise(self, saved_privacy: dict) -> None:
        """Raise if the checkpoint's rounds ran with other noise than this run would add.

        Epsilon is computed from this run's noise multipliers for every round, so rounds
        that ran with less noise (for example calibrated for fewer ``rounds`` or a larger
        ``target_epsilon``) would be under-counted.
        """
        local = self.local_privacy
        saved = (
            int(saved_privacy["restart_interval"]),
            float(saved_privacy["noise_multiplier_restart"]),
            float(saved_privacy["noise_multiplier_difference"]),
            str(saved_privacy.get("subroutine", "gd")),
            int(saved_privacy.get("local_steps", 1)),
            float(saved_privacy.get("local_sample_rate", 1.0)),
            float(saved_privacy.get("noise_multiplier_local", 0.0)),
        )
        current = (
            int(self.hparams.restart_interval),
            *self.noise_multipliers,
            *(
                ("gd", 1, 1.0, 0.0)
                if local is None
                else ("bvr-l-sgd", local.local_steps, local.sample_rate, local.noise_multiplier)
            ),
        )
        same = saved[0] == current[0] and saved[3:6] == current[3:6]
        for index in (1, 2, 6):
            same = same and math.isclose(saved[index], current[index], rel_tol=1e-9)
        if not same:
            raise ValueError(
                "The checkpoint's rounds ran with (restart_interval, sigma1, sigma2, "
                "subroutine, local_steps, local_sample_rate, sigma3) = "
                f"{saved}, but this run has {current}, so the reported "
                "epsilon would not cover the earlier rounds. Resume with the model settings "
                "of the checkpoint's run (rounds, target_epsilon, delta, restart_interval, "
                "restart_share, subroutine, local_steps, local_sample_rate, local_share or "
                "the noise multipliers)."
            )
