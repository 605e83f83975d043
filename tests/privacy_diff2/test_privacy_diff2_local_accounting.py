"""Tests of the privacy accounting of DIFF2-BVR-L-SGD against Opacus' Rényi-DP functions."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from zoo.privacy import diff2_accounting
from zoo.privacy.diff2_accounting import (
    LocalStepsPrivacy,
    calibrate_noise,
    calibrate_noise_with_local_steps,
    count_rounds,
    diff2_epsilon,
    diff2_rdp,
)

DELTA = 1e-5


def local_share_at_optimal_order(
    sigmas: tuple[float, float, float], rounds: int, interval: int, local: LocalStepsPrivacy
) -> float:
    """Return the local steps' share of the total Rényi DP at the order that sets epsilon."""
    counts = (*count_rounds(rounds, interval), local.mechanisms(rounds))
    messages, steps = diff2_rdp(sigmas, counts, local.sample_rate)
    total = [message + step for message, step in zip(messages, steps, strict=True)]
    _, order = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=DELTA)
    index = RDPAccountant.DEFAULT_ALPHAS.index(order)
    return steps[index] / total[index]


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


# The first two rows are diff2-lvr-adult's local steps with 10 rounds. With the earlier
# split by the estimate 2 q^2 alpha / sigma3^2, q = 1e-4 gave the local steps almost the
# whole budget (sigma1 = 1104, sigma3 = 0.70) and the run diverged.
@pytest.mark.parametrize(
    ("rounds", "local_steps", "sample_rate", "local_share"),
    [
        (10, 3, 0.02, 0.5),
        (10, 3, 1e-4, 0.5),
        (100, 3, 0.02, 0.5),
        (100, 3, 1e-4, 0.2),
        (100, 5, 1e-4, 0.8),
    ],
)
def test_local_share_holds_for_small_rates(
    rounds: int, local_steps: int, sample_rate: float, local_share: float
) -> None:
    local = LocalStepsPrivacy(local_steps, sample_rate, 0.0)
    sigmas = calibrate_noise_with_local_steps(
        1.0, DELTA, rounds, 10, local, local_share=local_share
    )
    share = local_share_at_optimal_order(sigmas, rounds, 10, local)
    assert share == pytest.approx(local_share, abs=0.02)
    spent = diff2_epsilon(
        rounds,
        10,
        sigmas[0],
        sigmas[1],
        DELTA,
        LocalStepsPrivacy(local_steps, sample_rate, sigmas[2]),
    )
    assert spent <= 1.0
    assert spent == pytest.approx(1.0, rel=1e-3)


def test_small_rate_keeps_message_noise_moderate() -> None:
    # The messages keep half of the budget, so sigma1 stays within a small factor of
    # DIFF2-GD's (5.72 for 10 rounds), far from the 1104 of the earlier split.
    sigma_gd, _ = calibrate_noise(1.0, DELTA, 10, 10)
    sigmas = calibrate_noise_with_local_steps(1.0, DELTA, 10, 10, LocalStepsPrivacy(3, 1e-4, 0.0))
    assert sigmas[0] < 5 * sigma_gd
    assert sigmas[1] < 5 * 3 * sigma_gd


def test_reference_order_fallback_spends_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reporting the next larger order as optimal keeps the fixed-point search from ever
    # settling, so the calibration must scale the budget at its best visited order.
    exact = diff2_accounting._epsilon_of_multipliers
    orders = RDPAccountant.DEFAULT_ALPHAS

    def shifted(*args: object) -> tuple[float, float]:
        epsilon, order = exact(*args)
        return epsilon, float(orders[min(orders.index(order) + 1, len(orders) - 1)])

    monkeypatch.setattr(diff2_accounting, "_epsilon_of_multipliers", shifted)
    local = LocalStepsPrivacy(3, 0.02, 0.0)
    sigmas = calibrate_noise_with_local_steps(1.0, DELTA, 100, 10, local)
    monkeypatch.undo()
    spent = diff2_epsilon(
        100, 10, sigmas[0], sigmas[1], DELTA, LocalStepsPrivacy(3, 0.02, sigmas[2])
    )
    assert spent <= 1.0
    assert spent == pytest.approx(1.0, rel=1e-3)
    share = local_share_at_optimal_order(sigmas, 100, 10, local)
    assert share == pytest.approx(0.5, abs=0.1)


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
