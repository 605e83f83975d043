"""Tests of DIFF2 privacy accounting against Opacus' Rényi-DP functions."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from zoo.privacy.diff2_accounting import (
    calibrate_noise,
    count_rounds,
    diff2_epsilon,
)

DELTA = 1e-5


def test_count_rounds_splits_restarts() -> None:
    assert count_rounds(10, 1) == (10, 0)
    assert count_rounds(10, 3) == (4, 6)
    assert count_rounds(10, 10) == (1, 9)
    assert count_rounds(10, 50) == (1, 9)
    assert count_rounds(0, 4) == (0, 0)


def test_epsilon_matches_hand_composition() -> None:
    # 4 restart rounds at sigma 3 and 8 difference rounds at sigma 5, each a Gaussian
    # mechanism with sampling rate 1: RDP(alpha) = alpha * (4 / (2 * 9) + 8 / (2 * 25)).
    orders = RDPAccountant.DEFAULT_ALPHAS
    rho = 4 / 18 + 8 / 50
    by_hand, _ = get_privacy_spent(orders=orders, rdp=[rho * a for a in orders], delta=DELTA)
    from_opacus_rdp = compute_rdp(
        q=1.0, noise_multiplier=3.0, steps=4, orders=orders
    ) + compute_rdp(q=1.0, noise_multiplier=5.0, steps=8, orders=orders)
    via_compute_rdp, _ = get_privacy_spent(orders=orders, rdp=from_opacus_rdp, delta=DELTA)
    ours = diff2_epsilon(12, 3, 3.0, 5.0, DELTA)
    assert ours == pytest.approx(by_hand, rel=1e-9)
    assert ours == pytest.approx(via_compute_rdp, rel=1e-9)


def test_epsilon_grows_with_rounds() -> None:
    values = [diff2_epsilon(r, 5, 4.0, 6.0, DELTA) for r in (1, 5, 6, 20)]
    assert values == sorted(values)
    assert values[0] < values[-1]
    assert diff2_epsilon(0, 5, 4.0, 6.0, DELTA) == 0.0
    assert diff2_epsilon(3, 5, 0.0, 6.0, DELTA) == math.inf


@pytest.mark.parametrize("target", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("interval", [1, 5, 100])
def test_calibrated_noise_spends_target(target: float, interval: int) -> None:
    sigma_restart, sigma_difference = calibrate_noise(target, DELTA, 100, interval)
    spent = diff2_epsilon(100, interval, sigma_restart, sigma_difference, DELTA)
    assert spent <= target
    assert spent == pytest.approx(target, rel=1e-3)


def test_dp_gd_calibration_matches_opacus() -> None:
    # With T = 1 every round is a full-batch Gaussian mechanism: Opacus' own calibration
    # for sampling rate 1 and 100 steps must find the same multiplier (to its tolerance).
    sigma_restart, sigma_difference = calibrate_noise(2.0, DELTA, 100, 1)
    opacus_sigma = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=1.0, steps=100, accountant="rdp"
    )
    assert sigma_difference == 0.0
    assert sigma_restart == pytest.approx(opacus_sigma, rel=0.01)


def test_restart_share_shifts_noise() -> None:
    low_share = calibrate_noise(1.0, DELTA, 100, 10, restart_share=0.2)
    high_share = calibrate_noise(1.0, DELTA, 100, 10, restart_share=0.8)
    assert high_share[0] < low_share[0]
    assert high_share[1] > low_share[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"delta": 1.5}, "delta"),
        ({"rounds": 0}, "rounds"),
        ({"restart_share": 1.0}, "restart_share"),
        ({"target_epsilon": 0.01}, "below what"),
    ],
)
def test_calibrate_invalid_arguments(kwargs: dict, match: str) -> None:
    arguments = {"target_epsilon": 1.0, "delta": DELTA, "rounds": 10, "restart_interval": 2}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise(**arguments)
