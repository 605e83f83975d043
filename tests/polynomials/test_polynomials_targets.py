"""Tests of the Hermite helpers, the hierarchical targets and the datamodule."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.datamodules.polynomials import HierarchicalPolynomialDataModule
from zoo.polynomials.hermite import hermite_coefficient, normalized_hermite
from zoo.polynomials.targets import HierarchicalPolynomial

MONTE_CARLO_SAMPLES = 100_000


def _moments(values: torch.Tensor) -> tuple[float, float, float]:
    values = values.double()
    mean = float(values.mean())
    second = float((values**2).mean())
    centred = values - mean
    excess_kurtosis = float((centred**4).mean() / (centred**2).mean() ** 2 - 3.0)
    return mean, second, excess_kurtosis


def test_hermite_orthonormal_under_gaussian() -> None:
    for i in range(5):
        for j in range(5):
            coefficient = hermite_coefficient(lambda z, i=i: normalized_hermite(i, z), j)
            expected = 1.0 if i == j else 0.0
            assert coefficient == pytest.approx(expected, abs=1e-10), (i, j)


def test_hermite_coefficients_of_activations() -> None:
    # ReLU: c_2 = 1 / (2 sqrt(pi)) and no odd coefficient of degree >= 3. tanh is odd.
    assert hermite_coefficient(torch.relu, 2) == pytest.approx(
        1 / (2 * math.sqrt(math.pi)), abs=1e-3
    )
    assert abs(hermite_coefficient(torch.relu, 3)) < 1e-6
    assert abs(hermite_coefficient(torch.tanh, 2)) < 1e-6


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_feature_normalised_mean_and_variance(degree: int) -> None:
    target = HierarchicalPolynomial(input_dim=12, feature_degree=degree, seed=3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MONTE_CARLO_SAMPLES, 12, generator=generator)
    mean, second, _ = _moments(target.feature(x))
    # Standard errors at N = 100000: about 0.003 for the mean, below 0.01 for E[p^2].
    assert abs(mean) < 0.012
    assert second == pytest.approx(1.0, abs=0.04)


def test_feature_nearly_gaussian_for_many_directions() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MONTE_CARLO_SAMPLES, 64, generator=generator)
    kurtosis = {}
    for directions in (4, 64):
        target = HierarchicalPolynomial(64, 2, num_directions=directions, seed=0)
        kurtosis[directions] = _moments(target.feature(x))[2]
    assert abs(kurtosis[64]) < 0.5
    assert abs(kurtosis[64]) < abs(kurtosis[4])


def test_link_evaluates_hermite_series() -> None:
    target = HierarchicalPolynomial(8, 2, link_coefficients=[0.5, 1.0, 0.0, 1.0], seed=0)
    z = torch.linspace(-2, 2, 9)
    expected = 0.5 + z + (z**3 - 3 * z) / math.sqrt(6)
    torch.testing.assert_close(target.link(z), expected)
    assert target.link_degree == 3


def test_link_without_linear_term_rejected() -> None:
    with pytest.raises(ValueError, match="first Hermite coefficient"):
        HierarchicalPolynomial(8, 2, link_coefficients=[0.0, 0.0, 1.0])


def test_link_without_linear_term_allowed_on_request() -> None:
    target = HierarchicalPolynomial(
        8, 2, link_coefficients=[0.0, 0.0, 1.0], require_linear_term=False
    )
    assert target.link_coefficients == (0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("link", "message"),
    [
        ([1.0], "constant link"),
        ([0.0, 1.0, 0.0], "trailing zeros"),
        ("z", "list of numbers"),
        ([0.0, 1.0, float("nan")], "NaN or infinite"),
        ([0.0, float("inf"), 1.0], "NaN or infinite"),
    ],
)
def test_bad_link_rejected(link: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        HierarchicalPolynomial(8, 2, link_coefficients=link)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_dim": 0, "feature_degree": 2}, "input_dim"),
        ({"input_dim": 8, "feature_degree": 0}, "feature_degree"),
        ({"input_dim": 8, "feature_degree": 3, "num_directions": 2}, "num_directions"),
        ({"input_dim": 8, "feature_degree": 2, "num_directions": 9}, "num_directions"),
    ],
)
def test_bad_dimensions_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HierarchicalPolynomial(**kwargs)


def test_datamodule_splits_fresh_and_repeatable() -> None:
    def build() -> HierarchicalPolynomialDataModule:
        module = HierarchicalPolynomialDataModule(
            input_dim=8,
            num_feature_samples=300,
            num_link_samples=200,
            num_val_samples=100,
            num_test_samples=100,
            seed=5,
        )
        module.setup()
        return module

    first, second = build(), build()
    assert first.train_set is not None and first.val_set is not None
    assert first.test_set is not None and second.train_set is not None
    torch.testing.assert_close(first.train_set.x, second.train_set.x)
    assert len(first.train_set) == 500
    assert int((first.train_set.part == 0).sum()) == 300
    assert int((first.train_set.part == 1).sum()) == 200
    # Independent draws: the splits start with different inputs.
    assert not torch.equal(first.val_set.x[:10], first.test_set.x[:10])
    assert not torch.equal(first.train_set.x[300:310], first.train_set.x[:10])
    torch.testing.assert_close(first.train_set.p, first.target.feature(first.train_set.x))
    torch.testing.assert_close(first.test_set.y, first.target(first.test_set.x))


def test_datamodule_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_link_samples"):
        HierarchicalPolynomialDataModule(num_link_samples=1)
    with pytest.raises(ValueError, match="noise_std"):
        HierarchicalPolynomialDataModule(noise_std=-0.1)
