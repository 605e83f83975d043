"""Solver statistics: error and stiffness estimates, step masks and per-sample stepping."""

from __future__ import annotations

import pytest
import torch

from zoo.ode.solver import solve_ivp


def decay_field(rates: torch.Tensor):
    return lambda t, y: rates * y


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_stiffness_estimate_of_linear_decay_is_rate(method: str) -> None:
    rates = torch.tensor([[-0.5], [-4.0], [-20.0]], dtype=torch.float64)
    y0 = torch.ones(3, 1, dtype=torch.float64)

    stats = solve_ivp(decay_field(rates), y0, [0.0, 1.0], method=method).stats

    for sample in range(3):
        taken_estimates = stats.stiffness_estimates[stats.step_mask[:, sample], sample]
        assert taken_estimates.numel() > 0
        torch.testing.assert_close(
            taken_estimates, torch.full_like(taken_estimates, -rates[sample].item())
        )


def test_stiffness_estimate_bounded_by_spectral_radius() -> None:
    # For y' = A y the ratio ||A d|| / ||d|| lies between the smallest and largest singular
    # value of A, and for a symmetric A those are the eigenvalue magnitudes.
    matrix = torch.tensor([[-10.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(matrix).abs()
    y0 = torch.tensor([[1.0, 1.0], [1.0, -2.0]], dtype=torch.float64)

    stats = solve_ivp(lambda t, y: y @ matrix.T, y0, [0.0, 2.0], rtol=1e-6, atol=1e-9).stats

    taken_estimates = stats.stiffness_estimates[stats.step_mask]
    assert (taken_estimates <= eigenvalues.max() + 1e-9).all()
    assert (taken_estimates >= eigenvalues.min() - 1e-9).all()
    # The fast mode dominates the stage differences at first, the slow mode once the fast one
    # has decayed, so the estimate moves from one eigenvalue magnitude to the other.
    first = stats.stiffness_estimates[0]
    last_taken = stats.stiffness_estimates[stats.n_accepted_per_sample - 1, torch.arange(2)]
    torch.testing.assert_close(first, eigenvalues.max().expand(2), rtol=1e-2, atol=0.0)
    torch.testing.assert_close(last_taken, eigenvalues.min().expand(2), rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_step_statistics_are_consistent(per_sample_steps: bool) -> None:
    rates = torch.tensor([[-1.0], [-8.0], [-2.0], [-0.1]], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [-1.0], [3.0], [0.5]], dtype=torch.float64)

    stats = solve_ivp(
        decay_field(rates), y0, [0.0, 2.0], rtol=1e-6, atol=1e-8, per_sample_steps=per_sample_steps
    ).stats

    rows = stats.n_accepted
    for tensor in (stats.error_estimates, stats.step_sizes, stats.stiffness_estimates):
        assert tensor.shape == (rows, 4)
    assert stats.step_mask.shape == (rows, 4)
    assert stats.step_mask.dtype == torch.bool
    # Accepted steps have a scaled error of at most 1 (with a shared step: the RMS over the
    # batch) and cover [0, 2] exactly.
    taken_errors = stats.error_estimates[stats.step_mask]
    assert (taken_errors > 0.0).all()
    if per_sample_steps:
        assert (taken_errors <= 1.0).all()
    else:
        assert (stats.error_estimates.square().mean(dim=1).sqrt() <= 1.0).all()
    torch.testing.assert_close(stats.step_sizes.sum(dim=0), torch.full((4,), 2.0).double())
    # Steps a sample did not take are zero.
    assert (stats.error_estimates[~stats.step_mask] == 0).all()
    assert (stats.step_sizes[~stats.step_mask] == 0).all()
    assert torch.equal(stats.n_accepted_per_sample, stats.step_mask.sum(dim=0))
    # Two evaluations pick the first step, then six per lock-step iteration. With per-sample
    # steps one iteration can hold both accepted and rejected samples.
    iterations = (stats.nfe - 2) / 6
    if per_sample_steps:
        assert max(stats.n_accepted, stats.n_rejected) <= iterations
        assert iterations <= stats.n_accepted + stats.n_rejected
    else:
        assert iterations == stats.n_accepted + stats.n_rejected


def test_per_sample_steps_match_solving_each_sample_alone() -> None:
    rates = torch.tensor([[-0.2], [-30.0], [-1.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [1.0], [2.0]], dtype=torch.float64)
    times = [0.0, 0.5, 1.5]

    batched = solve_ivp(decay_field(rates), y0, times, rtol=1e-5, atol=1e-8)

    for sample in range(3):
        alone = solve_ivp(
            decay_field(rates[sample : sample + 1]),
            y0[sample : sample + 1],
            times,
            rtol=1e-5,
            atol=1e-8,
        )
        assert batched.stats.n_accepted_per_sample[sample] == alone.stats.n_accepted
        assert batched.stats.n_rejected_per_sample[sample] == alone.stats.n_rejected
        torch.testing.assert_close(batched.ys[:, sample], alone.ys[:, 0], rtol=1e-12, atol=1e-14)


def test_hard_sample_does_not_slow_easy_samples() -> None:
    rates = torch.tensor([[-0.1], [-0.1], [-50.0]], dtype=torch.float64)
    y0 = torch.ones(3, 1, dtype=torch.float64)

    per_sample = solve_ivp(decay_field(rates), y0, [0.0, 1.0], rtol=1e-6, atol=1e-9).stats
    shared = solve_ivp(
        decay_field(rates), y0, [0.0, 1.0], rtol=1e-6, atol=1e-9, per_sample_steps=False
    ).stats

    easy_steps = per_sample.n_accepted_per_sample[:2]
    hard_steps = per_sample.n_accepted_per_sample[2]
    assert (easy_steps < hard_steps / 2).all(), per_sample.n_accepted_per_sample
    # With a shared step every sample takes the steps that the hard one needs.
    assert (shared.n_accepted_per_sample == shared.n_accepted).all()
    assert (easy_steps < shared.n_accepted / 2).all()


def test_time_argument_shape_follows_mode() -> None:
    seen: list[tuple[int, ...]] = []

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return -y

    y0 = torch.ones(5, 2)
    solve_ivp(field, y0, [0.0, 1.0], per_sample_steps=True)
    assert set(seen) == {(5,)}
    seen.clear()
    solve_ivp(field, y0, [0.0, 1.0], per_sample_steps=False)
    assert set(seen) == {()}


def test_time_dependent_field_uses_each_sample_time() -> None:
    # y' = cos(t) has y(t) = y0 + sin(t), whatever step each sample takes.
    y0 = torch.tensor([[0.0], [1.0], [-2.0]], dtype=torch.float64)
    times = torch.linspace(0.0, 3.0, 4, dtype=torch.float64)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(t).unsqueeze(1) * (1.0 + 0.0 * y)

    solution = solve_ivp(field, y0, times, rtol=1e-9, atol=1e-11)

    exact = y0 + torch.sin(times)[:, None, None]
    torch.testing.assert_close(solution.ys, exact, rtol=0.0, atol=1e-8)


def test_multi_dimensional_state_keeps_its_shape() -> None:
    y0 = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    solution = solve_ivp(lambda t, y: -y, y0, [0.0, 0.5, 1.0], rtol=1e-8, atol=1e-10)

    assert solution.ys.shape == (3, 3, 2, 4)
    torch.testing.assert_close(solution.ys[-1], y0 * torch.exp(torch.tensor(-1.0)).double())


def test_many_output_times_off_zero() -> None:
    # Outputs on [-3, 2], several per step of the slow sample, none at a step boundary.
    rates = torch.tensor([[-0.3], [-7.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    times = torch.linspace(-3.0, 2.0, 41, dtype=torch.float64)

    solution = solve_ivp(lambda t, y: rates * y, y0, times, rtol=1e-8, atol=1e-10)

    exact = y0 * torch.exp(rates * (times - times[0])[:, None, None])
    torch.testing.assert_close(solution.ys, exact, rtol=0.0, atol=1e-8)
    assert solution.stats.n_accepted_per_sample[0] < 40
