"""Privacy accounting helpers against Opacus' own accountants."""

from __future__ import annotations

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from zoo.privacy import accounting

SAMPLE_RATE = 256 / 60000
DELTA = 1e-5


TWO_PHASES = [(1.1, SAMPLE_RATE, 300), (0.9, SAMPLE_RATE, 120)]
ONE_PHASE = [(1.1, SAMPLE_RATE, 300)]


@pytest.mark.parametrize(
    ("name", "opacus_class", "history"),
    [
        ("rdp", RDPAccountant, TWO_PHASES),
        ("prv", PRVAccountant, TWO_PHASES),
        ("gdp", GaussianAccountant, ONE_PHASE),
    ],
)
def test_epsilon_matches_opacus_accountant(name: str, opacus_class: type, history: list) -> None:
    reference = opacus_class()
    for noise_multiplier, sample_rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    expected = reference.get_epsilon(delta=DELTA)
    assert accounting.epsilon_of(history, DELTA, name) == pytest.approx(expected, rel=1e-9)


def test_gdp_rejects_changing_noise() -> None:
    with pytest.raises(ValueError, match="cannot compose"):
        accounting.epsilon_of(TWO_PHASES, DELTA, "gdp")


def test_epsilon_of_empty_history_is_zero() -> None:
    assert accounting.epsilon_of([], DELTA, "rdp") == 0.0
    assert accounting.epsilon_of([(1.0, SAMPLE_RATE, 0)], DELTA, "prv") == 0.0


def test_calibration_matches_opacus() -> None:
    sigma = accounting.calibrate_noise_multiplier(3.0, DELTA, SAMPLE_RATE, 500, "rdp")
    expected = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=SAMPLE_RATE, steps=500, accountant="rdp"
    )
    assert sigma == expected
    epsilon = accounting.epsilon_of([(sigma, SAMPLE_RATE, 500)], DELTA, "rdp")
    assert 3.0 - 0.01 <= epsilon <= 3.0


def test_calibration_composes_prior_history() -> None:
    prior = [(1.0, SAMPLE_RATE, 400)]
    prior_epsilon = accounting.epsilon_of(prior, DELTA, "rdp")
    sigma = accounting.calibrate_noise_multiplier(
        3.0, DELTA, SAMPLE_RATE, 500, "rdp", prior_history=prior
    )
    total = accounting.epsilon_of([*prior, (sigma, SAMPLE_RATE, 500)], DELTA, "rdp")
    assert prior_epsilon < 3.0
    assert 3.0 - 0.01 <= total <= 3.0
    # The earlier training spends part of the budget, so the new steps need more noise.
    fresh = accounting.calibrate_noise_multiplier(3.0, DELTA, SAMPLE_RATE, 500, "rdp")
    assert sigma > fresh


def test_calibration_rejects_spent_budget() -> None:
    prior = [(0.5, SAMPLE_RATE, 5000)]
    with pytest.raises(ValueError, match="already spent"):
        accounting.calibrate_noise_multiplier(1.0, DELTA, SAMPLE_RATE, 10, "rdp", prior)


@pytest.mark.parametrize("hint", [1, 200, 5000])
def test_max_steps_is_last_step_in_budget(hint: int) -> None:
    prior = [(1.2, SAMPLE_RATE, 100)]
    steps = accounting.max_steps_within_budget(
        prior, 1.0, SAMPLE_RATE, 2.0, DELTA, "rdp", hint=hint
    )
    inside = accounting.epsilon_of([*prior, (1.0, SAMPLE_RATE, steps)], DELTA, "rdp")
    outside = accounting.epsilon_of([*prior, (1.0, SAMPLE_RATE, steps + 1)], DELTA, "rdp")
    assert steps > 0
    assert inside <= 2.0
    assert outside > 2.0


def test_max_steps_zero_when_prior_spends_budget() -> None:
    prior = [(0.5, SAMPLE_RATE, 5000)]
    assert accounting.max_steps_within_budget(prior, 1.0, SAMPLE_RATE, 1.0, DELTA, "rdp") == 0


@pytest.mark.parametrize(
    "entry",
    [(1.0, 0.0, 10), (1.0, 1.5, 10), (-1.0, 0.1, 10), (1.0, 0.1, -3), (1.0, 0.1)],
)
def test_history_rejects_invalid_entry(entry: tuple) -> None:
    with pytest.raises(ValueError, match="Privacy history entry 0"):
        accounting.normalise_history([entry])


def test_unknown_accountant_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown accountant 'moments'"):
        accounting.make_accountant("moments")
