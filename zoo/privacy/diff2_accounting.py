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

With the BVR-L-SGD subroutine (:mod:`zoo.privacy.diff2_local`), every round adds
``K - 1`` local steps per worker. Each is a subsampled Gaussian mechanism on the
worker's shard: Poisson sampling at rate ``q``, per-example clipping to ``C3`` and noise
of std ``sigma3 * C3``. A record sits on one worker, so a run adds ``R * (K - 1)`` such
mechanisms to the composition, which Opacus' ``compute_rdp`` accounts for at rate ``q``.
A local update divides by the expected sample size ``q * n_p`` of a shard of ``n_p``
records, and ``n_p`` is treated as public like ``N``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

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


@dataclass(frozen=True)
class LocalStepsPrivacy:
    """Privacy settings of the local steps of the BVR-L-SGD subroutine.

    Attributes:
        local_steps: ``K``, local steps per round. Each round runs ``K - 1`` private
            mechanisms, because the first local step uses the server's estimate as it is.
        sample_rate: ``q``, Poisson sampling rate of each local minibatch on a worker's shard.
        noise_multiplier: ``sigma3``. The noise std of a local step is ``sigma3 * C3``.
    """

    local_steps: int
    sample_rate: float
    noise_multiplier: float

    def mechanisms(self, rounds: int) -> int:
        """Return the number of local subsampled Gaussian mechanisms in ``rounds`` rounds."""
        return rounds * (self.local_steps - 1)


def check_local_steps_privacy(local: LocalStepsPrivacy) -> None:
    """Raise ValueError or TypeError naming the first invalid local-step privacy setting."""
    steps = local.local_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"local_steps must be an int >= 1, got {steps!r}.")
    rate = local.sample_rate
    if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
        raise ValueError(f"local_sample_rate must be in (0, 1], got {rate!r}.")
    sigma = local.noise_multiplier
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise_multiplier_local must be a finite number >= 0, got {sigma!r}.")


def diff2_accountant(
    rounds: int,
    restart_interval: int,
    noise_multiplier_restart: float,
    noise_multiplier_difference: float,
    local: LocalStepsPrivacy | None = None,
) -> RDPAccountant:
    """Return an Opacus RDP accountant that has recorded ``rounds`` rounds of DIFF2.

    ``local`` adds the local steps of the BVR-L-SGD subroutine, and ``None`` is DIFF2-GD.
    """
    restarts, differences = count_rounds(rounds, restart_interval)
    accountant = RDPAccountant()
    if restarts:
        accountant.history.append((noise_multiplier_restart, 1.0, restarts))
    if differences:
        accountant.history.append((noise_multiplier_difference, 1.0, differences))
    if local is not None and local.mechanisms(rounds):
        accountant.history.append(
            (local.noise_multiplier, local.sample_rate, local.mechanisms(rounds))
        )
    return accountant


def diff2_epsilon(
    rounds: int,
    restart_interval: int,
    noise_multiplier_restart: float,
    noise_multiplier_difference: float,
    delta: float,
    local: LocalStepsPrivacy | None = None,
) -> float:
    """Return the epsilon that ``rounds`` rounds of DIFF2 spend at ``delta``.

    ``local`` adds the local steps of the BVR-L-SGD subroutine, and ``None`` is DIFF2-GD.
    Zero rounds spend nothing. A zero multiplier on a mechanism that runs means no privacy
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
    if local is not None:
        check_local_steps_privacy(local)
        if local.mechanisms(rounds) and local.noise_multiplier == 0:
            return math.inf
    accountant = diff2_accountant(
        rounds, restart_interval, noise_multiplier_restart, noise_multiplier_difference, local
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


#: Default share of the Rényi-DP budget that the local steps of BVR-L-SGD get.
DEFAULT_LOCAL_SHARE = 0.5


def _local_step_rho(sample_rate: float) -> float:
    # Estimated Rényi DP per local step, divided by alpha / sigma3^2: 2 q^2 for a small
    # sampling rate q, and exactly 1/2 (the plain Gaussian mechanism) at q = 1.
    return min(2.0 * sample_rate**2, 0.5)


def _multipliers_for_budget(
    rho: float,
    counts: tuple[int, int, int],
    sample_rate: float,
    restart_share: float,
    local_share: float,
) -> tuple[float, float, float]:
    restarts, differences, local_mechanisms = counts
    global_rho = (1.0 - local_share) * rho
    if differences == 0:
        sigma_restart, sigma_difference = math.sqrt(restarts / (2.0 * global_rho)), 0.0
    else:
        sigma_restart = math.sqrt(restarts / (2.0 * restart_share * global_rho))
        sigma_difference = math.sqrt(differences / (2.0 * (1.0 - restart_share) * global_rho))
    per_step = _local_step_rho(sample_rate)
    sigma_local = math.sqrt(per_step * local_mechanisms / (local_share * rho))
    return sigma_restart, sigma_difference, sigma_local


def _epsilon_of_multipliers(
    multipliers: tuple[float, float, float],
    counts: tuple[int, int, int],
    sample_rate: float,
    delta: float,
) -> float:
    sigma_restart, sigma_difference, sigma_local = multipliers
    restarts, differences, local_mechanisms = counts
    orders = RDPAccountant.DEFAULT_ALPHAS
    gaussian_rho = restarts / (2.0 * sigma_restart**2)
    if differences:
        gaussian_rho += differences / (2.0 * sigma_difference**2)
    local_rdp = compute_rdp(
        q=sample_rate, noise_multiplier=sigma_local, steps=local_mechanisms, orders=orders
    )
    rdp = [gaussian_rho * order + local for order, local in zip(orders, local_rdp, strict=True)]
    with warnings.catch_warnings():
        # Bisection probes large multipliers, where Opacus warns that the largest order wins.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)


def calibrate_noise_with_local_steps(
    target_epsilon: float,
    delta: float,
    rounds: int,
    restart_interval: int,
    local: LocalStepsPrivacy,
    restart_share: float = DEFAULT_RESTART_SHARE,
    local_share: float = DEFAULT_LOCAL_SHARE,
    tolerance: float = 1e-4,
) -> tuple[float, float, float]:
    """Return ``(sigma1, sigma2, sigma3)`` so that DIFF2 with local steps spends the target.

    A bisection over a budget ``rho`` gives the restart and difference rounds
    ``(1 - local_share) * rho``, split by ``restart_share`` as in :func:`calibrate_noise`,
    and the ``R * (K - 1)`` local steps ``local_share * rho``. The split takes the Rényi DP
    of one local step at sampling rate ``q`` as ``min(2 q^2, 1/2) * alpha / sigma3^2``,
    which is an estimate for ``q < 1/2``. So ``local_share`` is the local steps'
    approximate share of the budget. The epsilon of every candidate is computed exactly
    with Opacus' ``compute_rdp``, so the result spends ``target_epsilon`` up to
    ``tolerance``, and never more. With ``K = 1`` there are no local mechanisms, and the
    result is :func:`calibrate_noise`'s with ``sigma3 = 0``.

    Args:
        target_epsilon: Privacy budget epsilon, > 0.
        delta: Target delta in (0, 1).
        rounds: Rounds ``R`` the budget must cover.
        restart_interval: ``T``.
        local: ``K`` and ``q`` of the local steps. Its ``noise_multiplier`` is ignored.
        restart_share: Share of the DIFF2 rounds' budget that restart rounds get, in (0, 1).
        local_share: Approximate share of the whole budget that local steps get, in (0, 1).
        tolerance: Relative accuracy of the bisection on ``rho``.

    Raises:
        ValueError: if an argument is out of range.
    """
    check_local_steps_privacy(local)
    if not 0.0 < local_share < 1.0:
        raise ValueError(f"local_share must be in (0, 1), got {local_share}.")
    if local.local_steps == 1:
        return (
            *calibrate_noise(
                target_epsilon, delta, rounds, restart_interval, restart_share, tolerance
            ),
            0.0,
        )
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}.")
    _check_delta(delta)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    if not 0.0 < restart_share < 1.0:
        raise ValueError(f"restart_share must be in (0, 1), got {restart_share}.")
    counts = (*count_rounds(rounds, restart_interval), local.mechanisms(rounds))
    if target_epsilon <= _epsilon_of_rho(0.0, delta):
        # Checked first because the bisection would otherwise probe multipliers so large
        # that Opacus' compute_rdp fails on rounding (around 1e8 at q = 0.1).
        raise ValueError(
            f"target_epsilon={target_epsilon} is below what Opacus' RDP conversion can "
            f"certify at delta={delta} with any noise; use a larger epsilon or delta."
        )

    def epsilon_of(rho: float) -> float:
        multipliers = _multipliers_for_budget(
            rho, counts, local.sample_rate, restart_share, local_share
        )
        return _epsilon_of_multipliers(multipliers, counts, local.sample_rate, delta)

    low, high = 0.0, 1.0
    while epsilon_of(high) < target_epsilon:
        low, high = high, 2.0 * high
    for _ in range(200):
        if high - low <= tolerance * high:
            break
        middle = 0.5 * (low + high)
        if epsilon_of(middle) <= target_epsilon:
            low = middle
        else:
            high = middle
    if low <= 0.0:
        raise ValueError(
            f"target_epsilon={target_epsilon} is below what Opacus' RDP conversion can "
            f"certify at delta={delta} with any noise; use a larger epsilon or delta."
        )
    return _multipliers_for_budget(low, counts, local.sample_rate, restart_share, local_share)


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), for example 1e-5; got {delta!r}.")
