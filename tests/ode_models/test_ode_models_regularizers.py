"""Regularizer values on hand-computed cases, annealing, and their effect on the NFE."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from zoo.ode.block import RegularizedODEBlock
from zoo.ode.regularizers import (
    CombinedRegularizer,
    ErrorEstimateRegularizer,
    KineticJacobianRegularizer,
    NoRegularizer,
    StiffnessEstimateRegularizer,
    annealed_weight,
    build_regularizer,
    reduce_over_steps,
)

VALUES = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
MASK = torch.tensor([[True, True], [True, True], [True, False]])


def fake_stats(**overrides: torch.Tensor) -> SimpleNamespace:
    """Statistics of a pretend solve: 3 steps, batch 2, the second sample took only 2."""
    stats = {
        "nfe": 20,
        "n_accepted": 3,
        "n_rejected": 0,
        "error_estimates": torch.tensor([[0.5, 0.2], [0.4, 0.1], [1.0, 0.0]]),
        "step_sizes": torch.tensor([[0.1, 0.5], [0.2, 0.5], [0.7, 0.0]]),
        "stiffness_estimates": torch.tensor([[7.0, 3.5068], [float("nan"), 1.0], [-14.0, 0.0]]),
        "step_mask": MASK,
    }
    stats.update(overrides)
    return SimpleNamespace(**stats)


@pytest.mark.parametrize(("reduction", "expected"), [("mean", 3.0), ("sum", 7.5), ("max", 4.5)])
def test_reduce_over_steps_by_hand(reduction: str, expected: float) -> None:
    # Sample 0 takes steps with values 1, 3, 5; sample 1 takes 2, 4 (its 0 is masked out).
    result = reduce_over_steps(VALUES, MASK, reduction)
    assert result.item() == pytest.approx(expected)


def test_reduce_over_steps_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="step_mask has shape"):
        reduce_over_steps(VALUES, MASK[:2], "mean")


def test_reduce_over_steps_rejects_unknown_reduction() -> None:
    with pytest.raises(ValueError, match="'median'"):
        reduce_over_steps(VALUES, MASK, "median")


def test_ernode_mean_and_sum_by_hand() -> None:
    stats = fake_stats()
    # EEst * dt per step: sample 0 -> 0.05, 0.08, 0.7; sample 1 -> 0.1, 0.05.
    mean = ErrorEstimateRegularizer("mean")(stats)
    total = ErrorEstimateRegularizer("sum")(stats)
    bare = ErrorEstimateRegularizer("sum", multiply_step_size=False)(stats)
    assert mean["total"].item() == pytest.approx(((0.05 + 0.08 + 0.7) / 3 + 0.15 / 2) / 2)
    assert total["total"].item() == pytest.approx((0.83 + 0.15) / 2)
    assert bare["total"].item() == pytest.approx((1.9 + 0.3) / 2)
    assert mean["error_estimate"] is mean["total"]


def test_srnode_scaling_and_nan_guard_by_hand() -> None:
    stats = fake_stats()
    scale = 3.5068
    # |estimates| / scale with NaN -> 0: sample 0 -> 7, 0, 14; sample 1 -> 3.5068, 1.
    maximum = StiffnessEstimateRegularizer("max", "tsit5")(stats)["total"].item()
    mean = StiffnessEstimateRegularizer("mean", "tsit5")(stats)["total"].item()
    unscaled = StiffnessEstimateRegularizer("sum", None)(stats)["total"].item()
    assert maximum == pytest.approx((14.0 / scale + 1.0) / 2, rel=1e-4)
    assert mean == pytest.approx((21.0 / 3 / scale + (scale + 1.0) / 2 / scale) / 2, rel=1e-4)
    assert unscaled == pytest.approx((21.0 + 4.5068) / 2, rel=1e-4)
    assert math.isfinite(maximum)


def test_srnode_gradient_is_finite_through_guard() -> None:
    estimates = torch.tensor([[2.0, float("nan")]], requires_grad=True)
    stats = fake_stats(stiffness_estimates=estimates, step_mask=torch.ones(1, 2, dtype=torch.bool))
    StiffnessEstimateRegularizer("sum", None)(stats)["total"].backward()
    assert torch.equal(estimates.grad, torch.tensor([[0.5, 0.0]]))


def test_combined_is_weighted_sum() -> None:
    stats = fake_stats()
    error = ErrorEstimateRegularizer("mean")
    stiffness = StiffnessEstimateRegularizer("mean", "tsit5")
    combined = CombinedRegularizer([error, stiffness], [1.0, 0.1])(stats)
    expected = error(stats)["total"] + 0.1 * stiffness(stats)["total"]
    assert combined["total"].item() == pytest.approx(expected.item())
    assert set(combined) == {"error_estimate", "stiffness_estimate", "total"}


def test_combined_rejects_weight_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 regularizers but 1 weights"):
        CombinedRegularizer([NoRegularizer(), NoRegularizer()], [1.0])


def test_build_regularizer_names_and_errors() -> None:
    assert isinstance(build_regularizer("none"), NoRegularizer)
    assert isinstance(build_regularizer("ernode", reduction="sum"), ErrorEstimateRegularizer)
    assert isinstance(build_regularizer("srnode"), StiffnessEstimateRegularizer)
    assert isinstance(build_regularizer("rnode"), KineticJacobianRegularizer)
    combined = build_regularizer("ernode+srnode", stiffness_weight=0.5)
    assert combined.weights == [1.0, 0.5]
    with pytest.raises(ValueError, match="'taynode'"):
        build_regularizer("taynode")
    with pytest.raises(TypeError, match="bogus"):
        build_regularizer("ernode+srnode", bogus=1)


def test_annealed_weight_endpoints_and_midpoint() -> None:
    assert annealed_weight(0, 100.0, 10.0, 2) == pytest.approx(100.0)
    assert annealed_weight(1, 100.0, 10.0, 2) == pytest.approx(math.sqrt(1000.0))
    assert annealed_weight(2, 100.0, 10.0, 2) == pytest.approx(10.0)
    assert annealed_weight(5, 0.1) == pytest.approx(0.1)


def test_annealed_weight_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="total_epochs=None"):
        annealed_weight(0, 100.0, 10.0)
    with pytest.raises(ValueError, match="initial=-1"):
        annealed_weight(0, -1.0)
    with pytest.raises(ValueError, match="epoch=-1"):
        annealed_weight(-1, 1.0)
    with pytest.raises(ValueError, match="final=-1"):
        annealed_weight(0, 0.0, -1.0, 2)


class ScaledLinear(nn.Module):
    """``f(t, y) = a * y`` with a fixed scalar ``a``."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rate * y


def test_rnode_integrals_match_closed_form() -> None:
    torch.manual_seed(0)
    rate, size = 0.5, 4000
    y0 = torch.randn(3, size)
    block = RegularizedODEBlock(
        ScaledLinear(rate), KineticJacobianRegularizer(), rtol=1e-7, atol=1e-9
    ).train()
    output = block(y0, torch.tensor([0.0, 1.0]))
    # Kinetic: integral of a^2 |y0|^2 e^(2at) / D dt = a |y0|^2 (e^(2a) - 1) / (2D).
    kinetic = (rate * y0.pow(2).sum(dim=1) * (math.exp(2 * rate) - 1) / (2 * size)).mean()
    assert output.terms["kinetic_energy"].item() == pytest.approx(kinetic.item(), rel=1e-4)
    # Jacobian a * I: the Hutchinson estimate of |J|_F^2 / D is a^2 |eps|^2 / D, close to a^2.
    assert output.terms["jacobian_frobenius"].item() == pytest.approx(rate**2, rel=0.05)
    torch.testing.assert_close(output.ys[-1], y0 * math.exp(rate), rtol=1e-5, atol=1e-5)


def test_rnode_skipped_in_eval_mode() -> None:
    block = RegularizedODEBlock(ScaledLinear(-1.0), KineticJacobianRegularizer()).eval()
    output = block(torch.ones(2, 3), torch.tensor([0.0, 1.0]))
    assert output.terms["total"].item() == 0.0
    assert output.ys.shape == (2, 2, 3)


def train_toy_ode(regularizer: str, weight: float, steps: int = 40) -> tuple[float, float]:
    """Fit ``y(1) = rotation(y0)`` with a stiff-initialized MLP; return (final NFE, loss)."""
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    with torch.no_grad():
        field[0].weight.mul_(4.0)
        field[2].weight.mul_(4.0)

    class Autonomous(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = field

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net(y)

    block = RegularizedODEBlock(
        Autonomous(), build_regularizer(regularizer), rtol=1e-6, atol=1e-6
    ).train()
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    y0 = torch.randn(64, 2)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    times = torch.tensor([0.0, 1.0])
    for _ in range(steps):
        output = block(y0, times)
        task = (output.ys[-1] - y0 @ rotation).pow(2).mean()
        loss = task + weight * output.penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = block.eval()(y0, times)
        task = (final.ys[-1] - y0 @ rotation).pow(2).mean()
    return float(final.stats.nfe), float(task)


@pytest.mark.parametrize(("regularizer", "weight"), [("ernode", 3.0), ("srnode", 0.5)])
def test_regularizer_lowers_nfe_on_toy_problem(regularizer: str, weight: float) -> None:
    plain_nfe, plain_loss = train_toy_ode("none", 0.0)
    regularized_nfe, regularized_loss = train_toy_ode(regularizer, weight)
    assert regularized_nfe <= 0.85 * plain_nfe
    assert regularized_loss < 1.5 * plain_loss
