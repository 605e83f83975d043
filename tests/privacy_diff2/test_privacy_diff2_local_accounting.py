"""Tests of the privacy accounting of DIFF2-BVR-L-SGD against Opacus' Rényi-DP functions."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from zoo.privacy.diff2_accounting import (
    LocalStepsPrivacy,
    calibrate_noise,
    calibrate_noise_with_local_steps,
    diff2_epsilon,
)

DELTA = 1e-5


def test_epsilon_matches_independent_composition() -> None:
    # 6 rounds with T = 3: 2 restart rounds (sigma 3), 4 difference rounds (sigma 5) and
    # 6 * (4 - 1) = 18 local steps at sampling rate 0.1 (sigma 1.5).
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = (
        compute_rdp(q=1.0, noise_multiplier=3.0, steps=2, orders=orders)
        + compute_rdp(q=1.0, noise_multiplier=5.0, steps=4, orders=orders)
        + compute_rdp(q=0.1, noise_multiplier=1.5, steps=18, orders=orders)
    )
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)

    # The same mechanisms recorded one step at a time, in the order they run.
    accountant = RDPAccountant()
    for round_index in range(6):
        if round_index % 3 == 0:
            accountant.step(noise_multiplier=3.0, sample_rate=1.0)
        else:
            accountant.step(noise_multiplier=5.0, sample_rate=1.0)
        for _ in range(3):
            accountant.step(noise_multiplier=1.5, sample_rate=0.1)
    stepwise = accountant.get_epsilon(delta=DELTA)

    ours = diff2_epsilon(6, 3, 3.0, 5.0, DELTA, LocalStepsPrivacy(4, 0.1, 1.5))
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours == pytest.approx(stepwise, rel=1e-9)
    assert ours > diff2_epsilon(6, 3, 3.0, 5.0, DELTA), "local steps must cost privacy"


def test_one_local_step_costs_nothing() -> None:
    without = diff2_epsilon(20, 5, 4.0, 6.0, DELTA)
    assert diff2_epsilon(20, 5, 4.0, 6.0, DELTA, LocalStepsPrivacy(1, 0.1, 0.0)) == without


def test_zero_local_noise_is_infinite() -> None:
    assert diff2_epsilon(3, 5, 4.0, 6.0, DELTA, LocalStepsPrivacy(2, 0.1, 0.0)) == math.inf
    assert diff2_epsilon(0, 5, 4.0, 6.0, DELTA, LocalStepsPrivacy(2, 0.1, 0.0)) == 0.0


@pytest.mark.parametrize("target", [0.5, 2.0])
@pytest.mark.parametrize(("local_steps", "sample_rate"), [(2, 1.0), (5, 0.05), (10, 0.01)])
def test_calibrated_local_noise_spends_target(
    target: float, local_steps: int, sample_rate: float
) -> None:
    local = LocalStepsPrivacy(local_steps, sample_rate, 0.0)
    sigmas = calibrate_noise_with_local_steps(target, DELTA, 40, 10, local)
    spent_local = LocalStepsPrivacy(local_steps, sample_rate, sigmas[2])
    spent = diff2_epsilon(40, 10, sigmas[0], sigmas[1], DELTA, spent_local)
    assert spent <= target
    assert spent == pytest.approx(target, rel=1e-3)
    assert min(sigmas) > 0


def test_one_local_step_calibrates_like_gd() -> None:
    local = LocalStepsPrivacy(1, 0.1, 0.0)
    assert calibrate_noise_with_local_steps(1.0, DELTA, 50, 10, local) == (
        *calibrate_noise(1.0, DELTA, 50, 10),
        0.0,
    )


def test_local_share_shifts_noise() -> None:
    local = LocalStepsPrivacy(5, 0.05, 0.0)
    low = calibrate_noise_with_local_steps(1.0, DELTA, 50, 10, local, local_share=0.2)
    high = calibrate_noise_with_local_steps(1.0, DELTA, 50, 10, local, local_share=0.8)
    assert high[2] < low[2]
    assert high[0] > low[0]
    assert high[1] > low[1]


def test_local_steps_raise_global_noise() -> None:
    # At the same budget, adding local mechanisms must leave less for the messages.
    sigma_restart, sigma_difference = calibrate_noise(1.0, DELTA, 50, 10)
    with_local = calibrate_noise_with_local_steps(
        1.0, DELTA, 50, 10, LocalStepsPrivacy(5, 0.05, 0.0)
    )
    assert with_local[0] > sigma_restart
    assert with_local[1] > sigma_difference


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"local": LocalStepsPrivacy(0, 0.1, 0.0)}, "local_steps"),
        ({"local": LocalStepsPrivacy(3, 0.0, 0.0)}, "local_sample_rate"),
        ({"local": LocalStepsPrivacy(3, 1.2, 0.0)}, "local_sample_rate"),
        ({"local_share": 1.0}, "local_share"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"rounds": 0}, "rounds"),
        ({"delta": 0.0}, "delta"),
        ({"target_epsilon": 0.01}, "below what"),
    ],
)
def test_calibrate_local_invalid_arguments(kwargs: dict, match: str) -> None:
    arguments = {
        "target_epsilon": 1.0,
        "delta": DELTA,
        "rounds": 10,
        "restart_interval": 2,
        "local": LocalStepsPrivacy(3, 0.1, 0.0),
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_with_local_steps(**arguments)
