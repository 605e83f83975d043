"""An image classifier with a quadratic-program layer inside, trained end to end (OptNet-style).

The network maps an image to the linear term ``q`` of a QP, solves
``min ½xᵀQx + qᵀx s.t. Gx <= h`` with the learned ``Q``, ``G`` and ``h`` in the zoo's
:class:`~zoo.optlayers.qp.QPLayer`, and classifies the solution ``x`` with a linear head.
Gradients reach ``q``, ``Q``, ``G`` and ``h`` through the KKT conditions of the QP (Amos and
Kolter, "OptNet: Differentiable Optimization as a Layer in Neural Networks", ICML 2017).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from zoo.optlayers.qp import QPLayer

logger = logging.getLogger(__name__)


class QPBlock(nn.Module):
    """QP layer with learned parameters: ``x*(q) = argmin ½xᵀQx + qᵀx s.t. Gx <= h``.

    ``Q = LLᵀ + eps·I`` is positive definite for any ``L``, and ``h = G z0 + softplus(s0)``
    keeps the point ``z0`` strictly feasible, so every problem has a unique solution.

    Args:
        dim: Number of QP variables.
        num_constraints: Number of inequality constraints.
        eps: Smallest eigenvalue added to ``Q``.
        tol: Interior-point tolerance.
        maxiter: Interior-point iteration limit.
    """

    def __init__(
        self, dim: int, num_constraints: int, eps: float = 0.1, tol: float = 1e-8, maxiter: int = 30
    ) -> None:
        super().__init__()
        if dim < 1 or num_constraints < 1:
            raise ValueError(
                f"dim and num_constraints must be at least 1, got {dim} and {num_constraints}."
            )
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.eps = eps
        self.factor = nn.Parameter(torch.eye(dim) + 0.1 * torch.randn(dim, dim))
        self.constraints = nn.Parameter(torch.randn(num_constraints, dim) / dim**0.5)
        self.center = nn.Parameter(torch.zeros(dim))
        self.raw_slack = nn.Parameter(torch.ones(num_constraints))
        self.qp = QPLayer(tol=tol, maxiter=maxiter, on_failure="warn")

    def forward(self, linear_term: torch.Tensor) -> torch.Tensor:
        """Solve one QP per row of ``linear_term`` ``(batch, dim)``; returns ``(batch, dim)``."""
        dim = self.factor.shape[0]
        quadratic = self.factor @ self.factor.T + self.eps * torch.eye(
            dim, dtype=self.factor.dtype, device=self.factor.device
        )
        bound = self.constraints @ self.center + F.softplus(self.raw_slack)
        return self.qp(quadratic, linear_term, self.constraints, bound)


class QPNetClassifier(pl.LightningModule):
    """MLP encoder, QP layer and linear head, for flattened images.

    Args:
        input_dim: Number of input values per example (64 for 8 x 8 digits).
        hidden_dim: Width of the encoder's hidden layer.
        qp_dim: Number of QP variables.
        num_constraints: Number of QP inequality constraints.
        num_classes: Number of classes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        qp_tol: Interior-point tolerance.
        qp_maxiter: Interior-point iteration limit.
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dim: int = 64,
        qp_dim: int = 16,
        num_constraints: int = 16,
        num_classes: int = 10,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        qp_tol: float = 1e-8,
        qp_maxiter: int = 30,
    ) -> None:
        super().__init__()
        for name, value in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("qp_dim", qp_dim),
            ("num_constraints", num_constraints),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, qp_dim)
        )
        self.qp = QPBlock(qp_dim, num_constraints, tol=qp_tol, maxiter=qp_maxiter)
        self.head = nn.Linear(qp_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for images of any shape ``(batch, ...)`` with ``input_dim`` values."""
        flat = images.flatten(1)
        if flat.shape[1] != self.hparams.input_dim:
            raise ValueError(
                f"Expected {self.hparams.input_dim} values per example, got {flat.shape[1]} "
                f"(input shape {tuple(images.shape)})."
            )
        return self.head(self.qp(self.encoder(flat)))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        solution = self.qp.qp.last_solution
        converged = solution.converged.to(losses.device)
        # A non-converged QP returns zeros, not a solution, so leave it out of the loss.
        loss = (losses * converged).sum() / converged.sum().clamp_min(1)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        size = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True, sync_dist=True, batch_size=size)
        failures = (~converged).sum().float()
        self.log(f"{stage}/qp_failures", failures, reduce_fx="sum", sync_dist=True, batch_size=size)
        # Share of constraints with a positive multiplier: with none active, the QP layer
        # would reduce to the linear map -Q⁻¹q.
        active = (solution.ineq_dual > 1e-6).double().mean()
        self.log(f"{stage}/qp_active_fraction", active, sync_dist=True, batch_size=size)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the predicted class of each example; labels in the batch are ignored."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


@torch.no_grad()
def evaluate_accuracy(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of ``images`` that ``module`` classifies as ``labels``."""
    module.eval()
    logits = module(images)
    return (logits.argmax(-1) == labels).float().mean().item()
