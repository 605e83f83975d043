"""Baselines for hierarchical polynomial regression, as LightningModules.

- ``TwoLayerRegressor``: a two-layer network with every layer trained end to end by Adam.
- ``RandomFeatureRidge``: ridge regression on frozen random ReLU features, a finite
  approximation of kernel ridge regression with the arc-cosine kernel (Cho and Saul,
  2009; Rahimi and Recht, 2007).

Both train on the whole training set (D1 and D2 together) and log the same validation
and test metrics as the layerwise model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.polynomials.evaluation import Batch, PolynomialRegressionModule
from zoo.polynomials.hermite import get_activation
from zoo.polynomials.layerwise import Sums, add_sums
from zoo.polynomials.networks import RandomFeatures, TwoLayerNetwork
from zoo.polynomials.ridge import ridge_sums, solve_ridge

__all__ = ["RANDOM_FEATURE_RIDGES", "RandomFeatureModel", "RandomFeatureRidge", "TwoLayerRegressor"]

RANDOM_FEATURE_RIDGES = tuple(10.0**exponent for exponent in range(-8, 1))
"""Ridge penalties for the random-feature baseline. Its features are scaled by
``1 / sqrt(m)``, so useful penalties are far smaller than for the layerwise stage 2."""


class TwoLayerRegressor(PolynomialRegressionModule):
    """Two-layer network ``a^T sigma(W x + b) + c`` trained end to end on the square loss.

    Args:
        input_dim: Input dimension d.
        hidden_width: Number of hidden neurons.
        activation: Hidden activation name.
        learning_rate: Adam learning rate.
        weight_decay: Decoupled weight decay (AdamW).
        seed: Seed for the initial weights.
    """

    def __init__(
        self,
        input_dim: int = 16,
        hidden_width: int = 512,
        activation: str = "relu",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got learning_rate={learning_rate!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}.")
        self.save_hyperparameters()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = TwoLayerNetwork(input_dim, hidden_width, activation)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch["x"]), batch["y"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )


class RandomFeatureModel(nn.Module):
    """Frozen random features followed by a linear readout: ``w^T phi(x) + c``.

    Args:
        input_dim: Input dimension d.
        num_features: Number of random features.
        activation: Feature activation name.
        seed: Seed for the random first layer.
    """

    def __init__(self, input_dim: int, num_features: int, activation: str, seed: int) -> None:
        super().__init__()
        self.random_features = RandomFeatures(input_dim, num_features, activation, seed)
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``f(x)``, shape ``(n,)``."""
        return self.random_features(x) @ self.weight + self.bias

    @torch.no_grad()
    def fit(self, sums: Sums, ridges: Sequence[float]) -> float:
        """Set the readout from summed :func:`ridge_sums` by ridge regression; return the penalty."""
        solution = solve_ridge(sums, ridges)
        self.weight.copy_(solution.weight.to(self.weight.dtype))
        self.bias.copy_(solution.bias.to(self.bias.dtype))
        return solution.ridge


class RandomFeatureRidge(PolynomialRegressionModule):
    """Ridge regression on random features, fitted in one pass over the training set.

    The single training epoch sums the normal equations over batches and DDP ranks, then
    solves them after its last batch with the penalty chosen by generalised
    cross-validation. Training stops after that epoch.

    Args:
        input_dim: Input dimension d.
        num_features: Number of random features; the Gram matrix is
            ``num_features^2`` float64 values.
        activation: Feature activation name.
        ridges: Candidate ridge penalties.
        seed: Seed for the random features.
    """

    def __init__(
        self,
        input_dim: int = 16,
        num_features: int = 2048,
        activation: str = "relu",
        ridges: Sequence[float] = RANDOM_FEATURE_RIDGES,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(ridges) == 0 or any(not 0 <= r < math.inf for r in ridges):
            raise ValueError(
                f"ridges must be a non-empty list of finite values >= 0, got {ridges!r}."
            )
        get_activation(activation)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = RandomFeatureModel(input_dim, num_features, activation, seed)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._sums: Sums | None = None

    def configure_optimizers(self) -> None:
        # The readout is solved in closed form at the end of the epoch.
        return None

    def on_train_epoch_start(self) -> None:
        self._sums = None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        if bool(self.fitted):
            return
        with torch.no_grad():
            features = self.net.random_features(batch["x"])
        self._sums = add_sums(self._sums, ridge_sums(features, batch["y"]))
        # Lightning validates before on_train_epoch_end, so solve here.
        if batch_idx == self.trainer.num_training_batches - 1:
            self._solve()

    def on_train_epoch_end(self) -> None:
        if not bool(self.fitted):
            # Reached only when this epoch ran no training batch at all.
            self._solve()
        self.trainer.should_stop = True

    def _solve(self) -> None:
        if self._sums is None:
            # This rank saw no batch; contribute zeros so that the reduction does not hang.
            empty = torch.zeros(0, self.hparams.num_features, device=self.device)
            self._sums = ridge_sums(empty, torch.zeros(0, device=self.device))
        sums = {
            key: self.trainer.strategy.reduce(value, reduce_op="sum")
            for key, value in self._sums.items()
        }
        self._sums = None
        ridge = self.net.fit(sums, self.hparams.ridges)
        self.fitted.fill_(True)
        self.log("train/ridge", ridge, on_step=False, on_epoch=True, sync_dist=True)
