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


def _rdp_budgets(target_epsilon: float, delta: float) -> list[tuple[float, float]]:
    # (order, Rényi DP that Opacus' conversion turns into exactly target_epsilon at this
    # order) for every default order with a positive budget. The conversion adds an
    # order-dependent offset to the Rényi DP, which is epsilon at zero Rényi DP.
    budgets = []
    with warnings.catch_warnings():
        # With a single order, Opacus warns that the optimal order is the smallest one.
        warnings.simplefilter("ignore", UserWarning)
        for order in RDPAccountant.DEFAULT_ALPHAS:
            offset, _ = get_privacy_spent(orders=[order], rdp=[0.0], delta=delta)
            if target_epsilon - offset > 0:
                budgets.append((float(order), float(target_epsilon - offset)))
    return budgets


def _local_multiplier_for_rdp(sample_rate: float, steps: int, order: float, rdp: float) -> float:
    # Smallest sigma3 (up to a relative 1e-9) whose `steps` subsampled Gaussian mechanisms
    # have Rényi DP at most `rdp` at `order`, by bisection on log(sigma3): compute_rdp
    # falls as sigma3 grows.
    def cost(sigma: float) -> float:
        return float(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=order))

    low, high = 1.0, 1.0
    while cost(high) > rdp:
        low, high = high, 2.0 * high
    while cost(low) <= rdp:
        if low < 1e-6:
            raise ValueError(
                f"The local steps stay within their Rényi-DP budget {rdp:.3g} at order "
                f"{order} even with noise multiplier 1e-6, so sigma3 cannot be calibrated. "
                "Lower local_share or target_epsilon, or set the noise multipliers by hand."
            )
        low, high = 0.5 * low, low
    while high - low > 1e-9 * high:
        middle = math.sqrt(low * high)
        if cost(middle) <= rdp:
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class _LocalSplit:
    # Round counts, sampling rate and shares that turn a reference order and its Rényi-DP
    # budget into the three multipliers.
    counts: tuple[int, int, int]
    sample_rate: float
    restart_share: float
    local_share: float

    def multipliers(self, order: float, budget: float) -> tuple[float, float, float]:
        restarts, differences, local_mechanisms = self.counts
        global_rho = (1.0 - self.local_share) * budget / order
        if differences == 0:
            sigma_restart, sigma_difference = math.sqrt(restarts / (2.0 * global_rho)), 0.0
        else:
            sigma_restart = math.sqrt(restarts / (2.0 * self.restart_share * global_rho))
            sigma_difference = math.sqrt(
                differences / (2.0 * (1.0 - self.restart_share) * global_rho)
            )
        sigma_local = _local_multiplier_for_rdp(
            self.sample_rate, local_mechanisms, order, self.local_share * budget
        )
        return sigma_restart, sigma_difference, sigma_local


def diff2_rdp(
    multipliers: tuple[float, float, float],
    counts: tuple[int, int, int],
    sample_rate: float,
) -> tuple[list[float], list[float]]:
    """Return the Rényi DP of the DIFF2 messages and of the local steps at Opacus' orders.

    Args:
        multipliers: ``(sigma1, sigma2, sigma3)``, all > 0 where their mechanisms run.
        counts: ``(restart rounds, difference rounds, local mechanisms)``.
        sample_rate: ``q`` of the local steps.

    Returns:
        ``(messages, local)``, one value per order of ``RDPAccountant.DEFAULT_ALPHAS``.
    """
    sigma_restart, sigma_difference, sigma_local = multipliers
    restarts, differences, local_mechanisms = counts
    orders = RDPAccountant.DEFAULT_ALPHAS
    gaussian_rho = restarts / (2.0 * sigma_restart**2) if restarts else 0.0
    if differences:
        gaussian_rho += differences / (2.0 * sigma_difference**2)
    if local_mechanisms:
        local = compute_rdp(
            q=sample_rate, noise_multiplier=sigma_local, steps=local_mechanisms, orders=orders
        )
    else:
        local = [0.0] * len(orders)
    return [gaussian_rho * order for order in orders], [float(value) for value in local]


def _epsilon_of_multipliers(
    multipliers: tuple[float, float, float],
    counts: tuple[int, int, int],
    sample_rate: float,
    delta: float,
) -> tuple[float, float]:
    # (epsilon, the order at which Opacus' conversion reaches it).
    messages, local = diff2_rdp(multipliers, counts, sample_rate)
    rdp = [message + step for message, step in zip(messages, local, strict=True)]
    with warnings.catch_warnings():
        # Large multipliers make the largest order optimal, and Opacus warns about that.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, order = get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
    return float(epsilon), float(order)


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

    The budget is split in Rényi DP at a reference order ``alpha``. Let ``B(alpha)`` be
    the Rényi DP that Opacus converts to ``target_epsilon`` at order ``alpha``. The
    restart and difference rounds get ``(1 - local_share) * B(alpha)``, split by
    ``restart_share`` as in :func:`calibrate_noise`. ``sigma3`` is set so that the exact
    Rényi DP of the ``R * (K - 1)`` local steps at ``alpha`` (Opacus' ``compute_rdp``) is
    ``local_share * B(alpha)``. This holds for every sampling rate ``q``, including rates
    at which the small-``q`` estimate ``2 q^2 alpha / sigma3^2`` is far off.

    The reference order starts at the order that is optimal for the Gaussian messages
    alone. It then moves to the order at which the split's total Rényi DP gives the
    smallest epsilon, until that order is the reference itself. Such a fixed point spends
    ``target_epsilon`` at an order where the local steps hold exactly ``local_share`` of
    the Rényi DP. Because Opacus' orders are discrete, the search may end without one. It
    then keeps the visited order with the largest epsilon and scales ``B`` up by bisection
    until the result spends ``target_epsilon`` (the local steps keep ``local_share`` at
    the reference order, and the optimal order is a neighbour of it). The result spends
    ``target_epsilon`` up to ``tolerance``, and never more. With ``K = 1`` there are no
    local mechanisms, and the result is :func:`calibrate_noise`'s with ``sigma3 = 0``.

    Args:
        target_epsilon: Privacy budget epsilon, > 0.
        delta: Target delta in (0, 1).
        rounds: Rounds ``R`` the budget must cover.
        restart_interval: ``T``.
        local: ``K`` and ``q`` of the local steps. Its ``noise_multiplier`` is ignored.
        restart_share: Share of the DIFF2 rounds' budget that restart rounds get, in (0, 1).
        local_share: Share of the Rényi DP at the reference order that local steps get,
            in (0, 1).
        tolerance: Relative accuracy of the spent epsilon.

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
    budgets = dict(_rdp_budgets(target_epsilon, delta))
    if not budgets:
        raise ValueError(
            f"target_epsilon={target_epsilon} is below what Opacus' RDP conversion can "
            f"certify at delta={delta} with any noise; use a larger epsilon or delta."
        )
    split = _LocalSplit(counts, local.sample_rate, restart_share, local_share)

    def spend(order: float, scale: float) -> tuple[tuple[float, float, float], float, float]:
        multipliers = split.multipliers(order, scale * budgets[order])
        epsilon, optimal_order = _epsilon_of_multipliers(
            multipliers, counts, local.sample_rate, delta
        )
        return multipliers, epsilon, optimal_order

    # Fixed-point search over the reference order. At scale 1 every candidate spends at
    # most target_epsilon, and exactly target_epsilon when its optimal order is itself.
    order = max(budgets, key=lambda candidate: budgets[candidate] / candidate)
    visited: dict[float, tuple[tuple[float, float, float], float]] = {}
    while order not in visited:
        multipliers, epsilon, optimal_order = spend(order, 1.0)
        visited[order] = (multipliers, epsilon)
        if optimal_order not in budgets:
            break
        order = optimal_order
    order = max(visited, key=lambda candidate: visited[candidate][1])
    multipliers, epsilon = visited[order]
    if target_epsilon * (1.0 - tolerance) <= epsilon <= target_epsilon:
        return multipliers

    # Rounding can put the fixed point a hair above the target, so the bracket may sit
    # below scale 1 as well.
    low, high = (0.5, 1.0) if epsilon > target_epsilon else (1.0, 2.0)
    while spend(order, low)[1] > target_epsilon:
        low, high = 0.5 * low, low
    while spend(order, high)[1] <= target_epsilon:
        low, high = high, 2.0 * high
    while high - low > tolerance * low:
        middle = 0.5 * (low + high)
        if spend(order, middle)[1] <= target_epsilon:
            low = middle
        else:
            high = middle
    return spend(order, low)[0]


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), for example 1e-5; got {delta!r}.")
