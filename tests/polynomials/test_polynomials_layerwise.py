"""Tests of the ridge solver and the two stages of the layerwise procedure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from zoo.polynomials.layerwise import apply_feature_step, feature_step_sums, fit_layerwise
from zoo.polynomials.networks import RandomFeatures, ThreeLayerNetwork, num_degree_features
from zoo.polynomials.ridge import ridge_sums, solve_ridge
from zoo.polynomials.study import StudySettings, run_cell
from zoo.polynomials.targets import HierarchicalPolynomial


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two intra-op threads on a shared 2-core machine are many times slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_ridge_matches_normal_equations() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    targets = features @ torch.arange(1.0, 6.0, dtype=torch.float64) + 3.0
    targets = targets + 0.1 * torch.randn(200, generator=generator, dtype=torch.float64)
    ridge = 0.3
    solution = solve_ridge(ridge_sums(features, targets), [ridge])
    centred = features - features.mean(0)
    expected = torch.linalg.solve(
        centred.T @ centred / 200 + ridge * torch.eye(5, dtype=torch.float64),
        centred.T @ (targets - targets.mean()) / 200,
    )
    torch.testing.assert_close(solution.weight, expected)
    expected_bias = targets.mean() - features.mean(0) @ expected
    torch.testing.assert_close(solution.bias, expected_bias)


def test_ridge_sums_add_over_batches() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(100, 4, generator=generator)
    targets = torch.randn(100, generator=generator)
    whole = ridge_sums(features, targets)
    halves = [ridge_sums(features[:37], targets[:37]), ridge_sums(features[37:], targets[37:])]
    for key, value in whole.items():
        torch.testing.assert_close(value, halves[0][key] + halves[1][key])


def test_gcv_prefers_small_ridge_without_noise() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(500, 10, generator=generator)
    targets = features @ torch.randn(10, generator=generator)
    solution = solve_ridge(ridge_sums(features, targets), [1e-6, 1e-2, 1.0, 10.0])
    assert solution.ridge == 1e-6


def test_feature_step_is_full_batch_gradient() -> None:
    generator = torch.Generator().manual_seed(3)
    net = ThreeLayerNetwork(6, 64, 5, "hermite2", "relu", seed=0)
    x = torch.randn(50, 6, generator=generator)
    y = torch.randn(50, generator=generator) + 2.0
    # Reference: autograd of the mean square loss with the output bias at the mean label.
    reference = ThreeLayerNetwork(6, 64, 5, "hermite2", "relu", seed=0)
    with torch.no_grad():
        reference.outer_bias.add_(y.mean() - reference(x).mean())
    loss = ((reference(x) - y) ** 2).mean()
    (gradient,) = torch.autograd.grad(loss, reference.weight)

    sums = feature_step_sums(net, x[:20], y[:20])
    batch = feature_step_sums(net, x[20:], y[20:])
    sums = {key: sums[key] + batch[key] for key in sums}
    apply_feature_step(net, sums, learning_rate=0.5)
    torch.testing.assert_close(net.weight, -0.5 * gradient, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(net.outer_bias, reference.outer_bias)


def test_stage_one_feature_beats_random_feature() -> None:
    target = HierarchicalPolynomial(8, 2, seed=0)
    generator = torch.Generator().manual_seed(4)
    x, y, _ = target.sample(4096, generator)
    x_test, _, p_test = target.sample(2000, generator)
    net = ThreeLayerNetwork(8, 1024, 8, "hermite2", "relu", seed=0)
    apply_feature_step(net, feature_step_sums(net, x, y), learning_rate=1.0)
    with torch.no_grad():
        learned = net.preactivations(x_test, with_bias=False)[:, 0]
        features = net.random_features(x_test)
    random_correlations = [
        abs(_correlation(features @ torch.randn(1024, generator=generator), p_test))
        for _ in range(10)
    ]
    assert abs(_correlation(learned, p_test)) > 0.8
    assert max(random_correlations) < 0.4


def test_stage_one_fails_without_linear_link_term() -> None:
    # Negative control: E[g'(z)] = 0 leaves no trace of p in the degree-2 part of h.
    target = HierarchicalPolynomial(
        8, 2, link_coefficients=[0.0, 0.0, 1.0], seed=0, require_linear_term=False
    )
    generator = torch.Generator().manual_seed(5)
    x, y, _ = target.sample(4096, generator)
    x_test, _, p_test = target.sample(2000, generator)
    net = ThreeLayerNetwork(8, 1024, 8, "hermite2", "relu", seed=0)
    apply_feature_step(net, feature_step_sums(net, x, y), learning_rate=1.0)
    with torch.no_grad():
        learned = net.preactivations(x_test, with_bias=False)[:, 0]
    assert abs(_correlation(learned, p_test)) < 0.3


def test_layerwise_fit_reduces_test_error() -> None:
    target = HierarchicalPolynomial(8, 2, seed=0)
    generator = torch.Generator().manual_seed(6)
    x1, y1, _ = target.sample(6144, generator)
    x2, y2, _ = target.sample(2048, generator)
    x_test, y_test, _ = target.sample(2000, generator)
    net = ThreeLayerNetwork(8, 1024, 32, "hermite2", "relu", seed=0)
    fit = fit_layerwise(net, (x1, y1), (x2, y2))
    with torch.no_grad():
        nmse = float(((net(x_test) - y_test) ** 2).mean() / y_test.var())
    assert fit.learning_rate > 0
    assert nmse < 0.5


def test_layerwise_beats_baselines_at_small_n() -> None:
    # d = 8, n = 8192 = 128 d^2: the layerwise net has learned p, the baselines still fit
    # only about its degree-2 part (the study gives NMSE 0.24 against 0.80 and 0.69).
    settings = StudySettings(
        feature_width=1024,
        hidden_width=32,
        random_feature_count=512,
        two_layer_steps=300,
        num_test_samples=2048,
    )
    errors = {
        method: run_cell(method, 8, 8192, 0, settings)["nmse"]
        for method in ("layerwise", "random_features", "two_layer")
    }
    assert errors["layerwise"] < 0.6 * errors["random_features"], errors
    assert errors["layerwise"] < 0.6 * errors["two_layer"], errors


def test_num_degree_features_counts_monomials() -> None:
    assert num_degree_features(16, 2) == 136
    assert num_degree_features(8, 3) == 120


def test_centred_features_have_zero_mean() -> None:
    layer = RandomFeatures(8, 256, "hermite2", seed=0, center=True)
    features = layer(torch.randn(10, 8))
    torch.testing.assert_close(features.mean(dim=1), torch.zeros(10), atol=1e-6, rtol=0)


def test_unknown_activation_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown activation 'swish'"):
        RandomFeatures(8, 16, "swish", seed=0)
