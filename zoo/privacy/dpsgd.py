"""DP-SGD for any LightningModule through Opacus, configured as a Lightning callback.

Add :class:`DPSGD` to ``trainer.callbacks`` (in Python or a LightningCLI config) and the
module trains with DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS
2016): Poisson-sampled batches, per-sample gradients clipped to ``max_grad_norm``, Gaussian
noise, and a privacy accountant. Opacus does all of that; this callback wires it into the
objects Lightning really uses, which is where integrations go wrong:

- the optimizer Lightning steps is replaced by Opacus' ``DPOptimizer``, and a check before
  every step raises if any other optimizer is about to step;
- the training batches come from Opacus' ``DPDataLoader`` (Poisson sampling) that Lightning
  cannot re-wrap, optionally split into physical batches by Opacus' batch splitting;
- per-sample gradient hooks are attached to the module that Lightning runs forward;
- under DDP the module is wrapped in Opacus' ``DifferentiallyPrivateDistributedDataParallel``
  and the optimizer is Opacus' ``DistributedDPOptimizer`` (noise added once, on rank 0);
- layers Opacus cannot train (BatchNorm) are replaced before training, or rejected.

Example config fragment::

    trainer:
      callbacks:
        - class_path: zoo.privacy.dpsgd.DPSGD
          init_args: {target_epsilon: 3.0, target_delta: 1.0e-5, max_grad_norm: 1.0}
"""

from __future__ import annotations

import logging
import math
import secrets
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class

from zoo.privacy import accounting, independence
from zoo.privacy.compatibility import make_trainable_with_dp
from zoo.privacy.loader import PoissonTrainLoader, noise_generator, sampling_generator
from zoo.privacy.modes import (
    GRAD_SAMPLE_MODES,
    EmptyBatchStep,
    ExpandedWeightsStep,
    GhostClippingStep,
    batch_size_of,
    per_example_losses,
    resolve_grad_sample_mode,
)

__all__ = ["DPSGD", "GRAD_SAMPLE_MODES"]

logger = logging.getLogger(__name__)

#: Version of the privacy state layout stored in checkpoints.
STATE_VERSION = 1


class DPSGD(Callback):
    """Train the LightningModule with differentially private SGD through Opacus.

    Give either ``noise_multiplier`` or ``target_epsilon`` (or both):

    - ``target_epsilon`` alone calibrates the noise multiplier so that the planned training
      (``epochs``, else ``trainer.max_epochs``) spends exactly that budget;
    - ``noise_multiplier`` alone trains with that noise and only reports epsilon;
    - both: train with that noise and stop when epsilon would exceed ``target_epsilon``.

    The logical (expected) batch size is the datamodule's ``batch_size``: each example enters
    a batch independently with probability ``1 / len(train_dataloader)``, as in Opacus'
    ``make_private``. Under DDP this logical batch is split across the processes, so the
    privacy guarantee does not depend on the number of devices.

    Epsilon is logged as ``privacy/epsilon`` after every training epoch. Checkpoints carry the
    privacy state (:meth:`state_dict`), so resuming with ``ckpt_path`` continues the
    accountant. A model loaded with ``zoo.load_pretrained`` whose manifest has a privacy
    state continues that accountant too, unless ``continue_pretrained_accounting`` is false.

    Args:
        target_epsilon: Privacy budget epsilon; training stops before it is exceeded.
        target_delta: Delta of the (epsilon, delta) guarantee; keep it well below
            1 / (number of training examples).
        noise_multiplier: Ratio of the noise standard deviation to ``max_grad_norm``.
        max_grad_norm: Bound C on the L2 norm of each example's gradient (flat clipping over
            all parameters).
        max_physical_batch_size: Largest number of examples put through the model at once;
            larger logical batches are split, and their gradients accumulated before one
            private step. ``None`` processes each logical batch at once.
        grad_sample_mode: Opacus per-sample gradient mode, one of :data:`GRAD_SAMPLE_MODES`
            (see :mod:`zoo.privacy.modes`). ``"auto"`` runs expanded weights (``"ew"``) when
            every trainable layer supports them and ``"hooks"`` otherwise. ``"ghost"`` needs
            ``training_step`` to return ``{"loss": ..., "per_example_loss": ...}``.
        accountant: Opacus accountant: ``"prv"`` (Opacus' default, tightest), ``"rdp"``
            (about 10x faster to evaluate) or ``"gdp"`` (approximate).
        epochs: Planned epochs for calibrating the noise from ``target_epsilon``;
            ``None`` uses ``trainer.max_epochs``.
        fix_model: Replace layers Opacus cannot train (BatchNorm becomes GroupNorm) and log
            each replacement; if false, such layers raise ``ValueError``.
        seed: Seed of the Poisson sampling and of the noise. ``None`` (the default) draws a
            fresh seed from the operating system's entropy in every fit, so that neither
            the batches nor the noise can be rebuilt from the run's config. An int makes
            both repeatable for tests and debugging, and voids the guarantee against
            anyone with the seed: subtracting the regenerated noise undoes the privacy.
        continue_pretrained_accounting: Start from the privacy history that
            ``zoo.load_pretrained`` attached to the model, so that epsilon covers the
            pretraining on the same data as well.
        check_independence: Before the first step, audit two examples of the first batch
            (see :mod:`zoo.privacy.independence`): the loss must treat them independently,
            and the active mode must give each its own gradient. Raise otherwise, because
            per-example clipping then bounds nothing. Turn it off only for a training step
            whose two-example gradient differs for a reason that keeps examples
            independent, such as randomness outside dropout layers.
        prior_checkpoint: Path of a Lightning checkpoint written under this callback,
            whose privacy history (key ``"privacy"``) the accountant continues. Use it when
            the module was loaded with ``load_from_checkpoint`` rather than resumed with
            ``ckpt_path``. It takes precedence over the ``zoo.load_pretrained`` history,
            which such a checkpoint already contains.
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        max_physical_batch_size: int | None = None,
        grad_sample_mode: str = "auto",
        accountant: str = "prv",
        epochs: int | None = None,
        fix_model: bool = True,
        seed: int | None = None,
        continue_pretrained_accounting: bool = True,
        prior_checkpoint: str | None = None,
        check_independence: bool = True,
    ) -> None:
        super().__init__()
        if target_epsilon is None and noise_multiplier is None:
            raise ValueError(
                "DPSGD needs target_epsilon or noise_multiplier (or both); got neither. "
                "For example target_epsilon=3.0 calibrates the noise for the planned epochs."
            )
        if target_epsilon is not None:
            _check_positive("target_epsilon", target_epsilon)
        _check_positive("target_delta", target_delta)
        if target_delta >= 1:
            raise ValueError(f"target_delta must be < 1, got {target_delta}; use e.g. 1e-5.")
        if noise_multiplier is not None:
            _check_positive("noise_multiplier", noise_multiplier)
        _check_positive("max_grad_norm", max_grad_norm)
        if max_physical_batch_size is not None:
            _check_positive_int("max_physical_batch_size", max_physical_batch_size)
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode {grad_sample_mode!r} is not supported here; choose one of "
                f"{', '.join(GRAD_SAMPLE_MODES)} ('auto' picks the fastest one that can "
                "train the model)."
            )
        accounting.check_accountant_name(accountant)
        if epochs is not None:
            _check_positive_int("epochs", epochs)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}.")

        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.target_delta = float(target_delta)
        self.requested_noise_multiplier = (
            None if noise_multiplier is None else float(noise_multiplier)
        )
        self.max_grad_norm = float(max_grad_norm)
        self.max_physical_batch_size = max_physical_batch_size
        self.grad_sample_mode = grad_sample_mode
        #: The Opacus mode of the current fit: ``grad_sample_mode`` with "auto" resolved.
        self.active_mode: str | None = None
        self.accountant_name = accountant
        self.epochs = epochs
        self.fix_model = fix_model
        self.seed = seed
        self.continue_pretrained_accounting = continue_pretrained_accounting
        if prior_checkpoint is not None and not isinstance(prior_checkpoint, str):
            raise TypeError(f"prior_checkpoint must be a path string, got {prior_checkpoint!r}.")
        self.prior_checkpoint = prior_checkpoint
        self.check_independence = bool(check_independence)

        # Privacy state; restored from checkpoints by load_state_dict.
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.prior_history: list[accounting.HistoryEntry] = []
        self.prior_source: str | None = None
        self.accountant = accounting.make_accountant(accountant)
        self.replaced_layers: list[tuple[str, str, str]] = []
        self.functorch_layers: list[str] = []

        # Objects of the current fit, released in teardown.
        self.optimizer: DPOptimizer | None = None
        self.train_loader: PoissonTrainLoader | None = None
        self._hooks: Any = None
        self._step_wrapper: ExpandedWeightsStep | GhostClippingStep | EmptyBatchStep | None = None
        self._original_step: Any = None
        self._independence_pending = False
        self._original_optimizer: torch.optim.Optimizer | None = None
        self._data_source: Any = None
        self._original_data_instance: Any = None
        self._patched_strategy: DDPStrategy | None = None
        self._trainer_epochs: int | None = None
        self._budget_end: int | None = None
        self._budget_message_sent = False
        self._steps_at_epoch_start = 0
        self._last_reported_step = 0
        self._epsilon_cache: tuple[tuple, float] | None = None

    # ----------------------------------------------------------------------------------
    # Public state

    @property
    def history(self) -> list[accounting.HistoryEntry]:
        """Accountant history ``(noise_multiplier, sample_rate, steps)``, earlier training first."""
        return [*self.prior_history, *accounting.normalise_history(self.accountant.history)]

    @property
    def steps(self) -> int:
        """Private optimizer steps taken in this and any resumed run (not the prior history)."""
        return accounting.total_steps(self.accountant.history)

    def epsilon(self) -> float:
        """Return epsilon at ``target_delta`` spent so far, prior history included."""
        key = tuple(self.history)
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            value = accounting.epsilon_of(key, self.target_delta, self.accountant_name)
            self._epsilon_cache = (key, value)
        return self._epsilon_cache[1]

    def privacy_state(self) -> dict[str, Any]:
        """Return the privacy state as plain values (for checkpoints and manifests)."""
        return {
            "version": STATE_VERSION,
            "mechanism": "dp-sgd",
            "accountant": self.accountant_name,
            "epsilon": self.epsilon(),
            "delta": self.target_delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "steps": self.steps,
            "total_steps": accounting.total_steps(self.history),
            "grad_sample_mode": self.active_mode or self.grad_sample_mode,
            "history": [list(entry) for entry in self.history],
            "prior_history": [list(entry) for entry in self.prior_history],
            "prior_source": self.prior_source,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the privacy state that Lightning stores in checkpoints."""
        state = self.privacy_state()
        state["run_history"] = [list(entry) for entry in self.accountant.history]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the privacy state of a checkpoint, so the accountant continues from it."""
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"Checkpoint privacy state has version {state_dict.get('version')!r}, expected "
                f"{STATE_VERSION}; it was written by an incompatible zoo version."
            )
        self.noise_multiplier = state_dict["noise_multiplier"]
        self.sample_rate = state_dict["sample_rate"]
        self.expected_batch_size = state_dict["expected_batch_size"]
        self.prior_history = accounting.normalise_history(state_dict["prior_history"])
        self.prior_source = state_dict.get("prior_source")
        self.accountant.history = accounting.normalise_history(state_dict["run_history"])
        if state_dict["delta"] != self.target_delta:
            rank_zero_warn(
                f"DP-SGD: the checkpoint was trained with delta {state_dict['delta']}, this run "
                f"uses target_delta {self.target_delta}; epsilon is reported at the new delta."
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Also store the privacy state under the top-level checkpoint key ``"privacy"``."""
        checkpoint["privacy"] = self.privacy_state()

    # ----------------------------------------------------------------------------------
    # Fit lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the trainer, fix or reject the model, and route DDP through Opacus' wrapper.

        Runs before Lightning builds the optimizer, so that the optimizer gets the parameters of the fixed layers.
        """
        if stage != "fit":
            return
        _check_trainer(trainer)
        limit = trainer.limit_train_batches
        whole_epochs = limit is None or (isinstance(limit, float) and limit == 1.0)
        if self.max_physical_batch_size is not None and not whole_epochs:
            raise ValueError(
                f"DPSGD cannot combine limit_train_batches={limit!r} with "
                f"max_physical_batch_size={self.max_physical_batch_size}: Lightning counts "
                "physical batches, so an epoch could end inside a logical batch, whose "
                "clipped gradients would then join the next epoch's step. Bound the run "
                "with max_steps or max_epochs, or drop max_physical_batch_size."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"DPSGD needs automatic optimization, but {type(pl_module).__name__} sets "
                "automatic_optimization = False. Let Lightning call the optimizer."
            )
        self.replaced_layers = make_trainable_with_dp(pl_module, fix=self.fix_model)
        for name, old, new in self.replaced_layers:
            rank_zero_info(f"DP-SGD: replaced layer {name} {old} with {new}")
        if isinstance(trainer.strategy, DDPStrategy):
            self._use_opacus_ddp(trainer.strategy)
        self._load_pretrained_history(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach per-sample gradient hooks, wrap the optimizer and install the Poisson loader.

        Runs after Lightning built the optimizer and restored any checkpoint, and before it
        requests the training data.
        """
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DPSGD supports exactly one optimizer, got {len(trainer.optimizers)} from "
                f"{type(pl_module).__name__}.configure_optimizers()."
            )
        distributed = trainer.world_size > 1
        model = trainer.strategy.model
        assert model is not None
        if distributed and not isinstance(model, DifferentiallyPrivateDistributedDataParallel):
            raise RuntimeError(
                f"DP-SGD under {trainer.world_size} processes expected the model wrapped in "
                f"Opacus' DPDDP, found {type(model).__name__}. Use strategy 'ddp'."
            )
        # Re-validate: a module may have built layers in its own setup() after ours ran.
        make_trainable_with_dp(pl_module, fix=False)
        mode = self.active_mode = resolve_grad_sample_mode(self.grad_sample_mode, pl_module)
        if mode != "ew":
            _check_module_parameters(pl_module)
        self._original_step = pl_module.training_step
        self._independence_pending = self.check_independence
        self.functorch_layers = []
        if mode == "ew":
            self._step_wrapper = ExpandedWeightsStep(pl_module)
        else:
            extra = {"max_grad_norm": self.max_grad_norm} if mode == "ghost" else {}
            self._hooks = prepare_module(
                model,
                grad_sample_mode=mode,
                wrap_model=False,
                batch_first=True,
                loss_reduction="mean",
                **extra,
            )
            # Poisson sampling and gradient accumulation across steps do not mix; Opacus
            # raises if per-sample gradients of two steps are about to be summed.
            self._hooks.forbid_grad_accumulation()
            self.functorch_layers = _functorch_layers(self._hooks, model, pl_module)
            if mode == "ghost":
                self._step_wrapper = GhostClippingStep(
                    pl_module, self._hooks, lambda: self.optimizer
                )
            elif mode == "functorch":
                self._step_wrapper = EmptyBatchStep(pl_module)
        if self._step_wrapper is not None:
            self._step_wrapper.install()
        if self.functorch_layers and mode in ("hooks", "ghost"):
            rank_zero_info(
                "DP-SGD: Opacus has no grad sampler for layers "
                f"{', '.join(self.functorch_layers)}; torch.func computes their per-sample "
                "gradients, which needs outputs with the batch as the first dimension."
            )

        base_loader, source = self._request_base_loader(trainer)
        dataset_size = len(base_loader.dataset)
        if self.sample_rate is None:
            self.sample_rate = 1.0 / len(base_loader)
        # As in Opacus' make_private: the expected batch size per process.
        self.expected_batch_size = int(dataset_size * self.sample_rate) / trainer.world_size
        self._trainer_epochs = _max_epochs(trainer)
        if self.noise_multiplier is None:
            self.noise_multiplier = self._choose_noise_multiplier(trainer)

        self._original_optimizer = trainer.optimizers[0]
        optimizer_class = get_optimizer_class(
            clipping="flat", distributed=distributed, grad_sample_mode=mode
        )
        self.optimizer = optimizer_class(
            self._original_optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
        )

        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        trainer.strategy.optimizers = [self.optimizer]

        if self.seed is None:
            seed = secrets.randbits(63)
        else:
            seed = self.seed
            rank_zero_warn(
                f"DP-SGD: seed={seed} makes the Poisson batches and the noise repeatable, so "
                "anyone who knows the seed can remove the noise. Leave seed unset (None) "
                "for a private run."
            )
        # The same generator in every process: all draw one global Poisson mask, which keeps
        # their physical batch counts equal (see DistributedPoissonBatchSampler).
        seed = int(trainer.strategy.broadcast(seed, src=0))
        self.optimizer.generator = noise_generator(
            seed, self.steps, trainer.global_rank, pl_module.device
        )
        self.train_loader = PoissonTrainLoader(
            base_loader,
            self.sample_rate,
            self.optimizer,
            sampling_generator(seed, self.steps),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            max_physical_batch_size=self.max_physical_batch_size,
        )
        self._data_source = source
        self._original_data_instance = source.instance
        source.instance = self.train_loader

        remaining = self._remaining_budget_steps()
        self._budget_end = None if remaining is None else self.steps + remaining
        rank_zero_info(
            f"DP-SGD: noise_multiplier={self.noise_multiplier:.4g}, "
            f"max_grad_norm={self.max_grad_norm:g}, sample_rate={self.sample_rate:.4g} "
            f"(expected batch {int(dataset_size * self.sample_rate)} of {dataset_size}), "
            f"{self.train_loader.steps_per_epoch} steps per epoch, grad_sample_mode={mode}, "
            f"accountant={self.accountant_name}, delta={self.target_delta:g}, "
            f"epsilon so far={self.epsilon():.3f}"
            + ("" if remaining is None else f", private steps left in budget={remaining}")
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop at once if a resumed or fine-tuned run has no privacy budget left."""
        if self._budget_spent():
            self._stop(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """On the first batch with two examples, audit the loss and the per-example mode."""
        if not self._independence_pending:
            return
        try:
            size = batch_size_of(batch)
        except LookupError:
            return  # The training step itself reports the missing batch dimension.
        if size < 2:
            return
        self._independence_pending = False
        if self._hooks is not None:
            self._hooks.disable_hooks()
        try:
            result = independence.audit(
                pl_module,
                self._original_step,
                lambda pair: self._mode_output(pl_module, pair, batch_idx),
                batch,
                batch_idx,
                size,
            )
        finally:
            if self._hooks is not None:
                self._hooks.enable_hooks()
        _raise_on_audit(result, type(pl_module).__name__, self.active_mode)
        rank_zero_info(
            f"DP-SGD: checked that examples are independent (relative difference "
            f"{result.coupling:.1e}) and that grad_sample_mode={self.active_mode} gives each "
            f"example's own gradient (relative difference "
            f"{max(result.mode_errors.values(), default=0.0):.1e})"
        )

    def _mode_output(
        self, pl_module: pl.LightningModule, pair: Any, batch_idx: int
    ) -> torch.Tensor:
        """Run the active mode on ``pair`` and return its per-example gradients (or norms)."""
        parameters = [p for p in pl_module.parameters() if p.requires_grad]
        # Gradients of an earlier step (on batches too small to audit) are consumed by now.
        for parameter in parameters:
            parameter.grad = None
            parameter.grad_sample = None
        try:
            if self.active_mode == "ew":
                assert isinstance(self._step_wrapper, ExpandedWeightsStep)
                output = self._step_wrapper._training_step(pair, batch_idx)
            else:
                self._hooks.enable_hooks()
                output = self._original_step(pair, batch_idx)
            if self.active_mode == "ghost":
                per_example_losses(output, 2, pl_module).mean().backward()
                return self._hooks.get_norm_sample().detach()
            loss = output["loss"] if isinstance(output, dict) else output
            loss.backward()
            if self.active_mode != "ew":
                assert self.optimizer is not None
                _check_grad_samples(self.optimizer, pl_module, self.functorch_layers)
            return torch.cat(
                [
                    (
                        torch.zeros(2, p.numel(), device=p.device)
                        if getattr(p, "grad_sample", None) is None
                        else p.grad_sample.detach().reshape(2, -1)
                    )
                    for p in parameters
                ],
                dim=1,
            )
        except NotImplementedError as error:
            if "tying" not in str(error):
                raise
            raise ValueError(
                f"DP-SGD ghost clipping cannot train {type(pl_module).__name__}: a layer's "
                "parameters are used more than once in a step (tied or reused weights), and "
                "Opacus' ghost clipping does not support that. Use grad_sample_mode 'ew' or "
                "'hooks'."
            ) from error
        finally:
            if self._hooks is not None:
                self._hooks.disable_hooks()
            for parameter in parameters:
                parameter.grad = None
                parameter.grad_sample = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Raise unless the optimizer about to step is this run's Opacus optimizer in budget."""
        if optimizer is not self.optimizer:
            raise RuntimeError(
                f"DP-SGD: Lightning is about to step {type(optimizer).__name__}, not the Opacus "
                "DPOptimizer, which would train without privacy. Another callback or the "
                "strategy replaced the optimizer after DPSGD installed it."
            )
        if self.active_mode != "ghost":
            _check_grad_samples(optimizer, pl_module, self.functorch_layers)
        is_private_step = not optimizer._check_skip_next_step(pop_next=False)
        if is_private_step and self._budget_spent():
            raise RuntimeError(
                f"DP-SGD: the privacy budget epsilon={self.target_epsilon} is spent, but "
                "training continued past trainer.should_stop (min_epochs or min_steps force "
                "more steps). Lower min_epochs/min_steps or raise target_epsilon."
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Stop training when the next step would exceed the budget, and report progress.

        With physical batches Lightning cannot know the number of batches per epoch, so its
        progress output stays silent; this logs every tenth of the epoch's private steps.
        """
        if self._budget_spent():
            self._stop(trainer)
        if self.max_physical_batch_size is None or self.train_loader is None:
            return
        done = self.steps - self._steps_at_epoch_start
        total = self.train_loader.steps_per_epoch
        if done != self._last_reported_step and done % max(1, total // 10) == 0:
            self._last_reported_step = done
            rank_zero_info(
                f"DP-SGD: epoch {trainer.current_epoch}, private step {done}/{total}, "
                f"{batch_idx + 1} physical batches"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Drop a logical batch left unfinished by the last epoch; note the step count."""
        optimizer = self.optimizer
        if optimizer is not None and optimizer._is_last_step_skipped:
            rank_zero_warn(
                "DP-SGD: the previous epoch ended inside a logical batch; its clipped "
                "gradients are dropped instead of joining this epoch's first step."
            )
            for parameter in optimizer.params:
                parameter.summed_grad = None
            optimizer._is_last_step_skipped = False
        self._steps_at_epoch_start = self.steps
        self._last_reported_step = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log epsilon (at ``target_delta``) and the number of private steps."""
        epsilon = self.epsilon()
        pl_module.log("privacy/epsilon", epsilon, on_epoch=True, rank_zero_only=True)
        pl_module.log("privacy/steps", float(self.steps), on_epoch=True, rank_zero_only=True)
        rank_zero_info(
            f"DP-SGD: epoch {trainer.current_epoch} done, epsilon={epsilon:.3f} at "
            f"delta={self.target_delta:g} after {self.steps} private steps"
        )
        if trainer.world_size > 1:
            _check_replicas_agree(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Explain per-sample gradient failures of layers that Opacus has no grad sampler for."""
        if not self.functorch_layers or "vmap" not in str(exception):
            return
        layers = ", ".join(self.functorch_layers)
        if "autograd.Function" in str(exception):
            # torch.func raises this for a Function without the setup_context staticmethod.
            rank_zero_warn(
                f"DP-SGD could not compute per-sample gradients with torch.func for layers "
                f"{layers}: they call a custom torch.autograd.Function that torch.func cannot "
                "transform. Give the Function a setup_context staticmethod and vmap support "
                "(see 'Extending torch.func with autograd.Function' in the PyTorch docs), or "
                "register a grad sampler with opacus.grad_sample.register_grad_sampler."
            )
            return
        rank_zero_warn(
            "DP-SGD could not compute per-sample gradients with torch.func for layers "
            f"{layers}. Each such layer must map a batch to "
            "outputs whose first dimension is the batch; a layer that returns the batch "
            "loss, or mixes examples, cannot be trained per example. Restructure the "
            "layer, or register a grad sampler with opacus.grad_sample.register_grad_sampler."
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove hooks and wrappers so the module and trainer can be used without DP again."""
        if stage != "fit":
            return
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks = None
        if self._step_wrapper is not None:
            self._step_wrapper.remove()
            self._step_wrapper = None
        self._original_step = None
        for parameter in pl_module.parameters():
            for name in ("grad_sample", "summed_grad", "_current_grad_sample"):
                if hasattr(parameter, name):
                    delattr(parameter, name)
        if self._data_source is not None:
            self._data_source.instance = self._original_data_instance
            self._data_source = None
        if self._patched_strategy is not None:
            strategy = self._patched_strategy
            del strategy.configure_ddp
            if isinstance(strategy.model, DifferentiallyPrivateDistributedDataParallel):
                strategy.model = pl_module
            self._patched_strategy = None
        if self._original_optimizer is not None and trainer.strategy.optimizers == [self.optimizer]:
            trainer.strategy.optimizers = [self._original_optimizer]

    # ----------------------------------------------------------------------------------
    # Helpers

    def _budget_spent(self) -> bool:
        return self._budget_end is not None and self.steps >= self._budget_end

    def _remaining_budget_steps(self) -> int | None:
        if self.target_epsilon is None:
            return None
        assert self.noise_multiplier is not None and self.sample_rate is not None
        return accounting.max_steps_within_budget(
            self.history,
            self.noise_multiplier,
            self.sample_rate,
            self.target_epsilon,
            self.target_delta,
            self.accountant_name,
            hint=self._planned_steps() or 1,
        )

    def _planned_steps(self) -> int | None:
        """Return the private steps left in the planned epochs, or None without a plan."""
        assert self.sample_rate is not None
        epochs = self.epochs if self.epochs is not None else self._trainer_epochs
        if epochs is None:
            return None
        steps_per_epoch = int(1 / self.sample_rate)
        return max(epochs * steps_per_epoch - self.steps, 0)

    def _choose_noise_multiplier(self, trainer: pl.Trainer) -> float:
        if self.requested_noise_multiplier is not None:
            return self.requested_noise_multiplier
        assert self.target_epsilon is not None and self.sample_rate is not None
        planned = self._planned_steps()
        if not planned:
            raise ValueError(
                "DPSGD cannot calibrate the noise from target_epsilon without a planned "
                f"length: trainer.max_epochs is {trainer.max_epochs} and epochs is "
                f"{self.epochs}. Set epochs (or trainer.max_epochs), or give noise_multiplier."
            )
        noise_multiplier = accounting.calibrate_noise_multiplier(
            self.target_epsilon,
            self.target_delta,
            self.sample_rate,
            planned,
            self.accountant_name,
            prior_history=self.history,
        )
        rank_zero_info(
            f"DP-SGD: calibrated noise_multiplier={noise_multiplier:.4g} for epsilon="
            f"{self.target_epsilon} at delta={self.target_delta:g} over {planned} steps"
        )
        return noise_multiplier

    def _request_base_loader(self, trainer: pl.Trainer) -> tuple[Any, Any]:
        # Lightning keeps where the training data comes from (datamodule, module or a given
        # loader) in the fit loop's data source. Asking it for the loader here and replacing
        # its instance by the Poisson loader makes Lightning train on exactly that loader.
        source = trainer.fit_loop._data_source
        if isinstance(source.instance, PoissonTrainLoader):
            source.instance = self._original_data_instance
        base = source.dataloader()
        if isinstance(base, (list, tuple, dict)):
            raise TypeError(
                "DP-SGD supports a single training DataLoader, got a collection of "
                f"{len(base)} loaders."
            )
        return base, source

    def _use_opacus_ddp(self, strategy: DDPStrategy) -> None:
        # Opacus' DPDDP broadcasts the initial weights and leaves gradient reduction to the
        # DistributedDPOptimizer, which sums the clipped gradients of all processes and adds
        # the noise once. Torch's DDP would also all-reduce the raw gradients in backward.
        def configure_ddp(this: DDPStrategy) -> None:
            this.model = DifferentiallyPrivateDistributedDataParallel(this.model)

        strategy.configure_ddp = types.MethodType(configure_ddp, strategy)
        self._patched_strategy = strategy
        rank_zero_info(
            "DP-SGD: DDP runs through Opacus' DifferentiallyPrivateDistributedDataParallel"
        )

    def _load_pretrained_history(self, pl_module: pl.LightningModule) -> None:
        if self.prior_history:
            return
        if self.prior_checkpoint is not None:
            self._load_checkpoint_history(self.prior_checkpoint)
            return
        if not self.continue_pretrained_accounting:
            return
        pretrained = getattr(pl_module, "zoo_pretrained", None) or {}
        privacy = (pretrained.get("extra") or {}).get("privacy")
        if not privacy:
            return
        self.prior_history = accounting.normalise_history(privacy["history"])
        self.prior_source = pretrained.get("name")
        rank_zero_info(
            f"DP-SGD: continuing the accountant of pretrained checkpoint {self.prior_source!r} "
            f"({accounting.total_steps(self.prior_history)} steps, epsilon "
            f"{privacy.get('epsilon')} at delta {privacy.get('delta')})"
        )

    def _load_checkpoint_history(self, path: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"prior_checkpoint {path!r} does not exist; give the .ckpt file of the "
                "earlier private run."
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        privacy = checkpoint.get("privacy") if isinstance(checkpoint, dict) else None
        if not privacy:
            raise ValueError(
                f"prior_checkpoint {path!r} has no 'privacy' entry, so it was not written "
                "during training with the DPSGD callback; its epsilon is unknown."
            )
        self.prior_history = accounting.normalise_history(privacy["history"])
        self.prior_source = path
        rank_zero_info(
            f"DP-SGD: continuing the accountant of checkpoint {path!r} "
            f"({accounting.total_steps(self.prior_history)} steps, epsilon "
            f"{privacy.get('epsilon')} at delta {privacy.get('delta')})"
        )

    def _stop(self, trainer: pl.Trainer) -> None:
        trainer.should_stop = True
        if not self._budget_message_sent:
            self._budget_message_sent = True
            rank_zero_info(
                f"DP-SGD: privacy budget epsilon={self.target_epsilon} at delta="
                f"{self.target_delta:g} reached after {self.steps} private steps "
                f"(epsilon={self.epsilon():.3f}); stopping training."
            )


def _functorch_layers(
    hooks: Any, model: torch.nn.Module, pl_module: pl.LightningModule
) -> list[str]:
    """Return the names of hooked layers whose per-sample gradients fall back to torch.func."""
    names = {id(module): name for name, module in pl_module.named_modules()}
    return [
        names.get(id(module)) or f"{type(module).__name__} (the module itself)"
        for module in hooks.iterate_submodules(model)
        if type(module) not in hooks.GRAD_SAMPLERS
    ]


def _raise_on_audit(result: independence.AuditResult, name: str, mode: str | None) -> None:
    """Raise if the first-batch audit found mixed examples or wrong per-example gradients."""
    if result.single_example_error is not None:
        raise ValueError(
            f"DP-SGD: {name}.training_step failed on a batch of one example "
            f"({result.single_example_error}). A model that needs several examples at once "
            "(batch statistics, BatchNorm in training mode) mixes examples, so per-example "
            "clipping bounds nothing and DP-SGD cannot train it."
        ) from result.single_example_error
    if result.sum_reduced:
        raise ValueError(
            f"DP-SGD: the loss of {name}.training_step is the sum over the batch, not the "
            "mean: its gradient on two examples is the sum of their single-example "
            "gradients. DPSGD runs Opacus with loss_reduction='mean'. Return the mean "
            "(for example reduction='mean' in the loss function)."
        )
    if result.coupling > independence.TOLERANCE:
        raise ValueError(
            f"DP-SGD: {name} does not treat the examples of a batch independently: the "
            "gradient of its loss on two examples differs from the mean of their "
            f"single-example gradients by {result.coupling:.1%}. Per-example clipping then "
            "bounds no example's influence, so the privacy guarantee would not hold. Models "
            "that mix examples (batch statistics, an adaptive ODE solver that couples the "
            "batch, losses over pairs) cannot be trained with DP-SGD. If only randomness "
            "outside dropout layers causes the difference, pass check_independence=False."
        )
    wrong = {
        key: error for key, error in result.mode_errors.items() if error > independence.TOLERANCE
    }
    if not wrong:
        return
    listed = ", ".join(f"{key} ({error:.1%})" for key, error in sorted(wrong.items()))
    if mode == "ghost":
        cause = (
            "Ghost clipping measures each example's gradient norm inside the layer that owns "
            "a parameter, so a penalty inside 'per_example_loss' or a parameter used outside "
            "its layer would be left unclipped."
        )
    else:
        cause = (
            f"Opacus' {mode} mode sees a parameter only inside the layer that owns it, so it "
            "drops a penalty on the weights or a weight that a functional call reuses."
        )
    raise ValueError(
        f"DP-SGD: grad_sample_mode={mode} gives per-example gradients that differ from each "
        f"example's own gradient, for {listed}. {cause} Put an L2 penalty into the "
        "optimizer's weight_decay instead. A weight reused by a functional call or a second "
        "layer trains with grad_sample_mode 'ew' when every layer supports expanded weights."
    )


def _check_module_parameters(pl_module: pl.LightningModule) -> None:
    """Raise if the LightningModule owns trainable parameters directly, outside its layers.

    Opacus' hooks and ghost clipping compute per-sample gradients per layer, and the
    LightningModule's own forward is not a layer that the training step calls.
    """
    own = [name for name, p in pl_module.named_parameters(recurse=False) if p.requires_grad]
    if own:
        raise ValueError(
            f"DP-SGD: parameters {', '.join(own)} belong to {type(pl_module).__name__} itself, "
            "not to one of its layers, and Opacus computes per-sample gradients per layer. "
            "Move them into a submodule (an nn.Module attribute whose forward uses them)."
        )


def _check_grad_samples(
    optimizer: DPOptimizer, pl_module: pl.LightningModule, functorch_layers: list[str]
) -> None:
    """Raise, naming the parameters, if Opacus' hooks gave some parameter no per-sample gradient.

    Opacus would raise "Per sample gradient is not initialized" inside ``optimizer.step``
    without saying which parameter or why.
    """
    names = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    missing = [
        names.get(id(parameter), f"<unnamed {tuple(parameter.shape)}>")
        for parameter in optimizer.params
        if getattr(parameter, "grad_sample", None) is None
    ]
    if not missing:
        return
    own = [name for name in missing if "." not in name]
    if own:
        raise ValueError(
            f"DP-SGD: parameters {', '.join(own)} belong to {type(pl_module).__name__} itself, "
            "not to one of its layers, and Opacus computes per-sample gradients per layer. "
            "Move them into a submodule (an nn.Module attribute whose forward uses them)."
        )
    owners = sorted({name.rpartition(".")[0] for name in missing} & set(functorch_layers))
    if owners:
        raise ValueError(
            f"DP-SGD: Opacus computed no per-sample gradient for parameters {', '.join(missing)}. "
            f"Layers {', '.join(owners)} have no Opacus grad sampler, and torch.func gives "
            "per-sample gradients only for a layer whose output has the batch as its first "
            "dimension. A layer that returns the batch loss, or mixes examples, cannot be "
            "trained per example. Restructure the layer, or register a grad sampler with "
            "opacus.grad_sample.register_grad_sampler."
        )
    raise ValueError(
        f"DP-SGD: Opacus computed no per-sample gradient for parameters {', '.join(missing)}. "
        "Its hooks pair every forward call of a layer with a backward call, so a layer "
        "that is called on inputs whose outputs do not all reach the loss (for example "
        "the vector field of an adaptive ODE solver, evaluated to choose the step size) "
        "or a parameter that the loss does not use cannot be trained per example. Use "
        "each layer's output in the loss, or freeze the parameters with requires_grad=False."
    )


def _check_replicas_agree(pl_module: pl.LightningModule) -> None:
    """Raise if the processes' parameters differ, which would mean the gradients were not shared."""
    flat = torch.cat(
        [parameter.detach().flatten().double() for parameter in pl_module.parameters()]
    )
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    fingerprint = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])
    gathered = pl_module.all_gather(fingerprint)
    if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=1e-9, atol=1e-9):
        raise RuntimeError(
            "DP-SGD: the model replicas of the DDP processes diverged (parameter fingerprints "
            f"{gathered.tolist()}); the private gradient was not shared across processes."
        )


def _max_epochs(trainer: pl.Trainer) -> int | None:
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or math.isinf(max_epochs):
        return None
    return int(max_epochs)


def _check_trainer(trainer: pl.Trainer) -> None:
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"DPSGD supports single-device training and the 'ddp' strategies, got "
            f"{type(trainer.strategy).__name__}. Use strategy='ddp' for several devices."
        )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"DPSGD does not support accumulate_grad_batches={trainer.accumulate_grad_batches}: "
            "stepping per micro-batch would count privacy wrongly. Raise the datamodule's "
            "batch_size (the logical batch) and set DPSGD(max_physical_batch_size=...) instead."
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"DPSGD does not support gradient_clip_val={trainer.gradient_clip_val}: Opacus "
            "clips each example's gradient itself. Set DPSGD(max_grad_norm=...) instead."
        )


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}.")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
