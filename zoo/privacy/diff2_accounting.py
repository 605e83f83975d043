"""Privacy accounting of DIFF2-GD with Opacus' Rényi-DP accountant.

Every round of DIFF2-GD is a Gaussian mechanism on the full data (sampling rate 1). Under
add/remove-one adjacency, the convention of Opacus, a record changes a worker's message
sum by at most the clip radius ``C``, and the noise std is ``sigma * C``. A run of
``R`` rounds with restart interval ``T`` composes ``ceil(R / T)`` restart rounds with
multiplier ``sigma1`` and ``R - ceil(R / T)`` difference rounds with multiplier ``sigma2``.
Opacus' :class:`~opacus.accountants.RDPAccountant` composes them and converts the Rényi-DP
curve to ``(epsilon, delta)``.

Each worker adds its own noise before sending, so every worker's message is private on
its own and the server need not be trusted. The total record count ``N`` that the server
divides by is treated as public, as Opacus does when it derives the expected batch size
from the dataset length.
"""

from __future__ import annotations

import math
import warnings

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent

#: Default share of the Rényi-DP budget that the restart rounds get. With 0.5 each kind of
#: round has a multiplier proportional to the square root of its count.
DEFAULT_RESTART_SHARE = 0.5


def count_rounds(rounds: int, restart_interval: int) -> tuple[int, int]:
    """Return ``(restart rounds, difference rounds)`` among the first ``rounds`` rounds."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}.")
    if restart_interval < 1:
        raise ValueError(f"restart_interval must be >= 1, got {restart_interval}.")
    restarts = math.ceil(rounds / restart_interval)
    return restarts, rounds - restarts


def diff2_accountant(
    rounds: int,
    restart_interval: int,
    noise_multiplier_restart: float,
    noise_multiplier_difference: float,
) -> RDPAccountant:
    """Return an Opacus RDP accountant that has recorded ``rounds`` rounds of DIFF2-GD."""
    restarts, differences = count_rounds(rounds, restart_interval)
    accountant = RDPAccountant()
    if restarts:
        accountant.history.append((noise_multiplier_restart, 1.0, restarts))
    if differences:
        accountant.history.append((noise_multiplier_difference, 1.0, differences))
    return accountant


def diff2_epsilon(
    rounds: int,
    restart_interval: int,
    noise_multiplier_restart: float,
    noise_multiplier_difference: float,
    delta: float,
) -> float:
    """Return the epsilon that ``rounds`` rounds of DIFF2-GD spend at ``delta``.

    Zero rounds spend nothing. A zero multiplier on a round that runs means no privacy
    (infinite epsilon).
    """
    _check_delta(delta)
    restarts, differences = count_rounds(rounds, restart_interval)
    if rounds == 0:
        return 0.0
    if (restarts and noise_multiplier_restart == 0) or (
        differences and noise_multiplier_difference == 0
    ):
        return math.inf
    accountant = diff2_accountant(
        rounds, restart_interval, noise_multiplier_restart, noise_multiplier_difference
    )
    return float(accountant.get_epsilon(delta=delta))


def _epsilon_of_rho(rho: float, delta: float) -> float:
    # A composition of Gaussian mechanisms has Rényi-DP rho * alpha at every order alpha.
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        # Bisection probes tiny rho, where Opacus warns that the largest order is optimal.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=orders, rdp=[rho * a for a in orders], delta=delta)
    return float(epsilon)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    restart_interval: int,
    restart_share: float = DEFAULT_RESTART_SHARE,
    tolerance: float = 1e-4,
) -> tuple[float, float]:
    """Return ``(sigma1, sigma2)`` so that ``rounds`` rounds spend ``target_epsilon``.

    The total Rényi-DP of the run is ``rho * alpha`` with
    ``rho = restarts / (2 sigma1^2) + differences / (2 sigma2^2)``. The function finds by
    bisection the largest ``rho`` whose ``epsilon`` (at ``delta``, with Opacus' conversion
    over its default orders) does not exceed the target, and gives the restart rounds the
    share ``restart_share`` of it. Without difference rounds (``T = 1`` or ``T >= rounds``)
    the restart rounds get all of it and ``sigma2`` is 0.

    Args:
        target_epsilon: Privacy budget epsilon, > 0.
        delta: Target delta in (0, 1); use much less than 1 / (number of records).
        rounds: Rounds ``R`` the budget must cover.
        restart_interval: ``T``.
        restart_share: Share of the budget that restart rounds get, in (0, 1).
        tolerance: Relative accuracy of the bisection on ``rho``.

    Raises:
        ValueError: if an argument is out of range.
    """
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}.")
    _check_delta(delta)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    if not 0.0 < restart_share < 1.0:
        raise ValueError(f"restart_share must be in (0, 1), got {restart_share}.")
    restarts, differences = count_rounds(rounds, restart_interval)

    low, high = 0.0, 1.0
    while _epsilon_of_rho(high, delta) < target_epsilon:
        low, high = high, 2.0 * high
    for _ in range(200):
        if high - low <= tolerance * high:
            break
        middle = 0.5 * (low + high)
        if _epsilon_of_rho(middle, delta) <= target_epsilon:
            low = middle
        else:
            high = middle
    rho = low
    if rho <= 0.0:
        # The largest default order (63) bounds epsilon below by about log(1/delta) / 62.
        raise ValueError(
            f"target_epsilon={target_epsilon} is below what Opacus' RDP conversion can "
            f"certify at delta={delta} with any noise; use a larger epsilon or delta."
        )
    if differences == 0:
        return math.sqrt(restarts / (2.0 * rho)), 0.0
    sigma_restart = math.sqrt(restarts / (2.0 * restart_share * rho))
    sigma_difference = math.sqrt(differences / (2.0 * (1.0 - restart_share) * rho))
    return sigma_restart, sigma_difference


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), for example 1e-5; got {delta!r}.")
