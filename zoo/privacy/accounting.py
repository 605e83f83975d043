"""Privacy accounting for DP-SGD on top of Opacus' accountants.

A DP-SGD run is a composition of subsampled Gaussian mechanisms. Opacus' accountants keep it
as a *history*: a list of ``(noise_multiplier, sample_rate, steps)`` entries. The helpers
here compute epsilon for a history, calibrate the noise multiplier for a target epsilon
(also on top of an earlier history, for fine-tuning), and find how many more steps fit into
a budget. Every epsilon comes from ``opacus.accountants``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

logger = logging.getLogger(__name__)

#: Opacus accountants by mechanism name: Renyi DP, privacy random variables (numerical
#: composition, Opacus' default) and Gaussian DP (a CLT approximation, not a strict bound).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")

#: One history entry: ``(noise_multiplier, sample_rate, steps)``.
HistoryEntry = tuple[float, float, int]

#: Upper end of the noise-multiplier search, as in ``opacus.accountants.utils``.
MAX_NOISE_MULTIPLIER = 1e6


def check_accountant_name(name: str) -> str:
    """Return ``name`` if it is an Opacus accountant this module supports, else raise."""
    if name not in ACCOUNTANTS:
        raise ValueError(
            f"Unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)} "
            "('prv' is Opacus' default, 'rdp' is faster)."
        )
    return name


def normalise_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Return ``history`` as a list of ``(float, float, int)`` tuples, checking each entry.

    Raises:
        ValueError: if an entry does not have three fields, or has a negative noise
            multiplier, a sample rate outside (0, 1] or a negative step count.
    """
    entries: list[HistoryEntry] = []
    for index, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(
                f"Privacy history entry {index} is {entry!r}; expected "
                "(noise_multiplier, sample_rate, steps)."
            )
        noise_multiplier, sample_rate, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if noise_multiplier < 0 or not 0 < sample_rate <= 1 or steps < 0:
            raise ValueError(
                f"Privacy history entry {index} is {entry!r}; expected noise_multiplier >= 0, "
                "0 < sample_rate <= 1 and steps >= 0."
            )
        entries.append((noise_multiplier, sample_rate, steps))
    return entries


def make_accountant(name: str, history: Iterable[Sequence[float]] = ()) -> IAccountant:
    """Create the Opacus accountant ``name`` that starts from ``history``.

    Raises:
        ValueError: for the ``"gdp"`` accountant with a history of more than one
            ``(noise_multiplier, sample_rate)`` pair, because Opacus' Gaussian accountant
            reads only the last entry and would drop the others without a word.
    """
    accountant = create_accountant(mechanism=check_accountant_name(name))
    entries = normalise_history(history)
    if name == "gdp" and entries:
        pairs = {(noise_multiplier, sample_rate) for noise_multiplier, sample_rate, _ in entries}
        if len(pairs) > 1:
            raise ValueError(
                f"The 'gdp' accountant cannot compose different noise multipliers or sample "
                f"rates, got {sorted(pairs)}; use the 'rdp' or 'prv' accountant."
            )
        noise_multiplier, sample_rate = pairs.pop()
        entries = [(noise_multiplier, sample_rate, total_steps(entries))]
    accountant.history = entries
    return accountant


def total_steps(history: Iterable[Sequence[float]]) -> int:
    """Return the number of DP-SGD steps recorded in ``history``."""
    return sum(int(entry[2]) for entry in history)


def epsilon_of(history: Iterable[Sequence[float]], delta: float, accountant: str = "prv") -> float:
    """Return epsilon at ``delta`` for ``history`` under the Opacus accountant ``accountant``.

    An empty history (no private step yet) has epsilon 0.
    """
    entries = normalise_history(history)
    if total_steps(entries) == 0:
        return 0.0
    return float(make_accountant(accountant, entries).get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior_history: Iterable[Sequence[float]] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """Return the smallest noise multiplier (within tolerance) that keeps epsilon in budget.

    The budget covers ``prior_history`` followed by ``steps`` steps at ``sample_rate``.
    Without a prior history this is ``opacus.accountants.utils.get_noise_multiplier``;
    with one it runs the same bisection over the composed history.

    Raises:
        ValueError: if the prior history alone already spends ``target_epsilon``, or no
            noise multiplier up to :data:`MAX_NOISE_MULTIPLIER` fits the budget.
    """
    prior = normalise_history(prior_history)
    check_accountant_name(accountant)
    if total_steps(prior) == 0:
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=epsilon_tolerance,
                )
            )
        except ValueError as error:
            # Opacus' search raises "The privacy budget is too low." without the values.
            raise ValueError(
                f"No noise multiplier keeps epsilon below target_epsilon={target_epsilon} at "
                f"delta={delta} for {steps} steps at sample rate {sample_rate:.4g} ({error}). "
                "Raise target_epsilon, or train fewer epochs."
            ) from error

    prior_epsilon = epsilon_of(prior, delta, accountant)
    if prior_epsilon >= target_epsilon:
        raise ValueError(
            f"The privacy budget is already spent: the earlier training has epsilon "
            f"{prior_epsilon:.3f} >= target_epsilon {target_epsilon} at delta {delta}. "
            "Raise target_epsilon, or start the accounting afresh if the new data is disjoint."
        )

    def epsilon_with(noise_multiplier: float) -> float:
        return epsilon_of([*prior, (noise_multiplier, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 10.0
    epsilon_high = epsilon_with(high)
    while epsilon_high > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"No noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon below "
                f"{target_epsilon} for {steps} more steps at sample rate {sample_rate}; "
                "train fewer steps or raise target_epsilon."
            )
        epsilon_high = epsilon_with(high)
    while target_epsilon - epsilon_high > epsilon_tolerance:
        middle = (low + high) / 2
        epsilon_middle = epsilon_with(middle)
        if epsilon_middle < target_epsilon:
            high, epsilon_high = middle, epsilon_middle
        else:
            low = middle
    return high


def max_steps_within_budget(
    history: Iterable[Sequence[float]],
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    delta: float,
    accountant: str = "prv",
    hint: int = 1,
    limit: int = 10_000_000,
) -> int:
    """Return how many more steps at ``(noise_multiplier, sample_rate)`` keep epsilon in budget.

    Epsilon grows with the number of steps, so a galloping search from ``hint`` followed by a
    bisection finds the largest ``k`` with ``epsilon(history + k steps) <= target_epsilon``.
    A good ``hint`` (the planned step count when the noise was calibrated for it) saves
    accountant calls, which take about 0.3 s each for the PRV accountant. Returns ``limit``
    if even ``limit`` steps fit.
    """
    prior = normalise_history(history)

    def fits(extra_steps: int) -> bool:
        entries = [*prior, (noise_multiplier, sample_rate, extra_steps)]
        return epsilon_of(entries, delta, accountant) <= target_epsilon

    if not fits(0):
        return 0
    hint = min(max(hint, 1), limit)
    stride = max(1, hint // 64)
    if fits(hint):
        low, high = hint, min(hint + stride, limit)
        while fits(high):
            if high >= limit:
                return limit
            low, stride = high, 2 * stride
            high = min(high + stride, limit)
    else:
        low, high = 0, hint
    # Invariant: fits(low) and not fits(high).
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
