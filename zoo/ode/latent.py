"""Latent ODE for irregularly sampled time series, with solver-heuristic regularization.

The model is the RNN-encoder latent ODE of Rubanova, Chen and Duvenaud, "Latent ODEs for
Irregularly-Sampled Time Series" (NeurIPS 2019). A GRU reads the observed frames backwards
in time and gives a Gaussian posterior over the initial latent state ``z0``. An autonomous
neural ODE carries ``z0`` to every frame time, and a linear decoder maps latent states to
the observations. Missing frames enter the GRU as zeros together with their observation mask.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from zoo.ode.block import RegularizedODEBlock
from zoo.ode.regularizers import (
    REGULARIZER_NAMES,
    annealed_weight,
    build_regularizer,
    resolve_anneal_epochs,
)
from zoo.ode.stats import solve_statistics
from zoo.ode.vector_fields import AutonomousMLP

logger = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; use an integer >= 1.")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} is invalid; use a number > 0.")


class MaskedGRUEncoder(nn.Module):
    """GRU over ``[values * mask, mask, time gap]`` read backwards in time.

    Returns the mean and log-variance of the posterior over ``z0``.
    """

    def __init__(self, num_features: int, hidden_size: int, latent_size: int) -> None:
        super().__init__()
        self.gru = nn.GRU(num_features + 2, hidden_size, batch_first=True)
        self.to_posterior = nn.Linear(hidden_size, 2 * latent_size)

    def forward(self, values: Tensor, mask: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
        """Encode ``values [B, T, F]``, ``mask [B, T]`` and ``times [T]``."""
        maskf = mask.to(values.dtype).unsqueeze(-1)
        gaps = torch.diff(times, prepend=times[:1]).expand(values.shape[0], -1).unsqueeze(-1)
        inputs = torch.cat([values * maskf, maskf, gaps], dim=-1).flip(dims=[1])
        _, hidden = self.gru(inputs)
        mean, log_var = self.to_posterior(hidden[-1]).chunk(2, dim=-1)
        return mean, log_var


class LatentODE(pl.LightningModule):
    """Latent ODE trained as a VAE on irregularly observed windows.

    The loss per window is the Gaussian negative log-likelihood of the observed frames
    (noise standard deviation ``obs_std``, averaged over observed entries) plus
    ``kl_weight * KL(q(z0) || N(0, I)) / num_features``, plus ``lambda(epoch) * R`` for the
    regularizer ``R``. Metrics: mean squared error (in standardized units) on all frames
    (``mse``) and on the frames the model did not see (``mse_unobserved``), with ``z0`` set
    to the posterior mean outside training.

    Args:
        num_features: Features per frame (50 for the CMU walking set).
        latent_size: Size of the latent ODE state.
        encoder_hidden_size: GRU width.
        ode_hidden_size: Width of the hidden layers of the latent vector field.
        ode_num_layers: Number of hidden layers of the latent vector field.
        obs_std: Standard deviation of the Gaussian observation model.
        kl_weight: Final weight of the KL term.
        kl_warmup_epochs: Epochs over which the KL weight rises linearly from 0; 0 disables.
        regularizer: ``"none"``, ``"ernode"``, ``"srnode"``, ``"ernode+srnode"`` or ``"rnode"``.
        regularizer_kwargs: Constructor arguments of the regularizer.
        reg_weight: Regularization weight at epoch 0 (``lambda0``).
        reg_weight_final: Weight reached after ``reg_anneal_epochs`` (``lambda1``); ``None``
            keeps it constant.
        reg_anneal_epochs: Length of the decay in epochs; ``None`` uses ``trainer.max_epochs``.
        method: Solver method, ``"tsit5"`` or ``"dopri5"``.
        rtol: Relative tolerance of the solver.
        atol: Absolute tolerance of the solver.
        max_steps: Maximum number of solver steps per solve.
        per_sample_steps: Give each window its own step sizes.
        lr: Adam learning rate.
        log_ode_stats: Attach :class:`zoo.callbacks.ode_stats.ODEStatsCallback`.
    """

    def __init__(
        self,
        num_features: int = 50,
        latent_size: int = 16,
        encoder_hidden_size: int = 64,
        ode_hidden_size: int = 64,
        ode_num_layers: int = 2,
        obs_std: float = 0.1,
        kl_weight: float = 1.0,
        kl_warmup_epochs: int = 0,
        regularizer: str = "none",
        regularizer_kwargs: dict[str, Any] | None = None,
        reg_weight: float = 0.0,
        reg_weight_final: float | None = None,
        reg_anneal_epochs: int | None = None,
        method: str = "tsit5",
        rtol: float = 1e-4,
        atol: float = 1e-4,
        max_steps: int = 10_000,
        per_sample_steps: bool = True,
        lr: float = 1e-2,
        log_ode_stats: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_features", num_features),
            ("latent_size", latent_size),
            ("encoder_hidden_size", encoder_hidden_size),
            ("ode_hidden_size", ode_hidden_size),
            ("ode_num_layers", ode_num_layers),
        ):
            _check_positive_int(name, value)
        _check_positive_float("obs_std", obs_std)
        _check_positive_float("lr", lr)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ValueError(f"kl_weight={kl_weight!r} is invalid; use a number >= 0.")
        if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, int):
            raise ValueError(f"kl_warmup_epochs={kl_warmup_epochs!r} is invalid; use an int >= 0.")
        if kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs={kl_warmup_epochs!r} is invalid; use an int >= 0.")
        if regularizer not in REGULARIZER_NAMES:
            raise ValueError(
                f"regularizer={regularizer!r} is not supported; use one of "
                f"{list(REGULARIZER_NAMES)}."
            )
        if reg_anneal_epochs is not None:
            _check_positive_int("reg_anneal_epochs", reg_anneal_epochs)
        annealed_weight(0, reg_weight, reg_weight_final, reg_anneal_epochs or 1)
        self.save_hyperparameters()

        self.encoder = MaskedGRUEncoder(num_features, encoder_hidden_size, latent_size)
        self.ode = RegularizedODEBlock(
            AutonomousMLP(latent_size, ode_hidden_size, ode_num_layers),
            build_regularizer(regularizer, **(regularizer_kwargs or {})),
            method=method,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            per_sample_steps=per_sample_steps,
        )
        self.decoder = nn.Linear(latent_size, num_features)
        self.ode_stats: dict[str, float] = {}

    def _check_batch(self, values: Tensor, mask: Tensor, times: Tensor) -> Tensor:
        features = self.hparams.num_features
        if values.dim() != 3 or values.shape[-1] != features:
            raise ValueError(
                f"values must have shape [batch, frames, {features}], got "
                f"{tuple(values.shape)}; set num_features to match the data."
            )
        if mask.shape != values.shape[:2]:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but values has {tuple(values.shape)}; "
                "the mask must be [batch, frames]."
            )
        grid = times[0] if times.dim() == 2 else times
        if grid.shape != values.shape[1:2]:
            raise ValueError(
                f"times has shape {tuple(times.shape)}, expected [{values.shape[1]}] or "
                f"[batch, {values.shape[1]}]."
            )
        if times.dim() == 2 and not torch.equal(times, grid.expand_as(times)):
            raise ValueError(
                "All windows of a batch must share one time grid, because the ODE is solved "
                "once for the batch; mark missing frames in the mask instead."
            )
        if not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("times must be strictly increasing.")
        return grid

    def forward_with_penalty(
        self, values: Tensor, mask: Tensor, times: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """Return reconstructions ``[B, T, F]``, the KL term, the penalty and solve statistics."""
        grid = self._check_batch(values, mask, times)
        mean, log_var = self.encoder(values, mask, grid)
        z0 = mean
        if self.training:
            z0 = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        output = self.ode(z0, grid - grid[0])
        reconstruction = self.decoder(output.ys).transpose(0, 1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(dim=-1).mean()
        return reconstruction, kl, output.penalty, solve_statistics(output)

    def forward(self, values: Tensor, mask: Tensor, times: Tensor) -> Tensor:
        """Return the reconstruction of every frame, ``[batch, frames, features]``."""
        reconstruction, _, _, stats = self.forward_with_penalty(values, mask, times)
        self.ode_stats = stats
        return reconstruction

    def current_reg_weight(self) -> float:
        """Return the regularization weight of the current epoch."""
        hparams = self.hparams
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        total = resolve_anneal_epochs(
            hparams.reg_anneal_epochs, hparams.reg_weight_final, max_epochs
        )
        epoch = self.current_epoch if self._trainer is not None else 0
        return annealed_weight(epoch, hparams.reg_weight, hparams.reg_weight_final, total)

    def current_kl_weight(self) -> float:
        """Return the KL weight of the current epoch (linear warm-up)."""
        warmup = self.hparams.kl_warmup_epochs
        epoch = self.current_epoch if self._trainer is not None else 0
        if warmup == 0:
            return float(self.hparams.kl_weight)
        return float(self.hparams.kl_weight) * min(1.0, epoch / warmup)

    def _errors(self, reconstruction: Tensor, values: Tensor, mask: Tensor) -> dict[str, Tensor]:
        squared = (reconstruction - values).pow(2).mean(dim=-1)
        observed = mask.to(values.dtype)
        unobserved = 1.0 - observed
        return {
            "mse": squared.mean(),
            "mse_observed": (squared * observed).sum() / observed.sum().clamp_min(1.0),
            "mse_unobserved": (squared * unobserved).sum() / unobserved.sum().clamp_min(1.0),
        }

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        values, mask, times = batch
        reconstruction, kl, penalty, stats = self.forward_with_penalty(values, mask, times)
        errors = self._errors(reconstruction, values, mask)
        variance = self.hparams.obs_std**2
        nll = 0.5 * errors["mse_observed"] / variance + 0.5 * math.log(2 * math.pi * variance)
        kl_weight = self.current_kl_weight()
        reg_weight = self.current_reg_weight()
        loss = nll + kl_weight * kl / self.hparams.num_features + reg_weight * penalty
        stats["reg_weight"] = reg_weight
        self.ode_stats = stats
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/nll", nll, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/kl", kl, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/mse", errors["mse"], on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        values, mask, times = batch
        reconstruction, _, _, stats = self.forward_with_penalty(values, mask, times)
        self.ode_stats = stats
        errors = self._errors(reconstruction, values, mask)
        batch_size = values.shape[0]
        for name, value in errors.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_epoch=True,
                sync_dist=True,
                batch_size=batch_size,
                prog_bar=name == "mse",
            )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        values, mask, times = batch
        return self(values, mask, times)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def configure_callbacks(self) -> list[pl.Callback]:
        if not self.hparams.log_ode_stats:
            return []
        from zoo.callbacks.ode_stats import ODEStatsCallback

        return [ODEStatsCallback()]
