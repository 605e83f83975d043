"""Butcher tableaus of the explicit Runge-Kutta 5(4) pairs used by :mod:`zoo.ode.solver`.

Both pairs are FSAL (first same as last): the seventh stage is evaluated at the new state, so
it is the first stage of the next step, and a step costs six evaluations of the vector field.

Sources:

- Tsit5: Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column
  simplifying assumption", Computers & Mathematics with Applications 62 (2011) 770-775,
  including its free 4th-order continuous extension.
- Dopri5: J. R. Dormand and P. J. Prince, "A family of embedded Runge-Kutta formulae",
  J. Comput. Appl. Math. 6 (1980) 19-26, with the 4th-order dense output of L. F. Shampine,
  "Some practical Runge-Kutta formulas", Math. Comp. 46 (1986) 135-150, in the form used by
  Hairer, Norsett and Wanner, "Solving Ordinary Differential Equations I" (1993), II.6.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ExplicitRKTableau:
    """Coefficients of an embedded explicit Runge-Kutta pair with a continuous extension.

    Attributes:
        name: Method name accepted by :func:`zoo.ode.solver.solve_ivp`.
        c: Stage times as fractions of the step, length ``s``.
        a: Lower-triangular stage weights: row ``i`` has ``i`` entries (row 0 is empty).
        b: Weights of the propagated (higher-order) solution, length ``s``.
        b_error: ``b - b_hat``, the weights of the embedded local error estimate.
        interpolation: ``[s, degree + 1]`` array. Row ``i`` contains the coefficients of
            ``theta**0 .. theta**degree`` of the dense-output weight ``b_i(theta)``, so that
            ``y(t + theta*h) = y + h * sum_i b_i(theta) * k_i`` for ``theta`` in ``[0, 1]``.
        order: Order of the propagated solution.
        error_order: Order of the embedded solution that the error estimate compares against.
        stability_region_size: Length of the real stability interval ``[-size, 0]``.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    interpolation: np.ndarray
    order: int
    error_order: int
    stability_region_size: float

    @property
    def n_stages(self) -> int:
        """Number of stages ``s``, the FSAL stage included."""
        return len(self.c)


def _poly(*factors: np.ndarray | list[float]) -> np.ndarray:
    """Multiply polynomials given by ascending coefficient lists."""
    result = np.array([1.0])
    for factor in factors:
        result = np.polynomial.polynomial.polymul(result, np.asarray(factor, dtype=np.float64))
    return result


def _pad(coefficients: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length)
    out[: len(coefficients)] = coefficients
    return out


def _tsit5_interpolation() -> np.ndarray:
    # Factored continuous-extension weights b_i(theta) of Tsitouras (2011).
    rows = [
        _poly(
            [0.0, -1.0530884977290216],
            [-1.3299890189751412, 1.0],
            [0.7139816917074209, -1.4364028541716351, 1.0],
        ),
        _poly([0.0, 0.0, 0.1017], [1.2949852507374631, -2.1966568338249754, 1.0]),
        _poly([0.0, 0.0, 2.490627285651252793], [1.57803468208092486, -2.38535645472061657, 1.0]),
        _poly(
            [0.0, 0.0, -16.54810288924490272],
            [-1.21712927295533244, 1.0],
            [-0.61620406037800089, 1.0],
        ),
        _poly(
            [0.0, 0.0, 47.37952196281928122],
            [-1.203071208372362603, 1.0],
            [-0.658047292653547382, 1.0],
        ),
        _poly([0.0, 0.0, -34.87065786149660974], [-1.2, 1.0], [-2.0 / 3.0, 1.0]),
        _poly([0.0, 0.0, 2.5], [-1.0, 1.0], [-0.6, 1.0]),
    ]
    return np.stack([_pad(row, 5) for row in rows])


def _dopri5_interpolation(b: tuple[float, ...]) -> np.ndarray:
    # Hairer's form: y(theta) = y0 + theta*(r1 + (1-theta)*(r2 + theta*(r3 + (1-theta)*r4)))
    # with r1 = dy, r2 = h*k1 - dy, r3 = 2*dy - h*k1 - h*k7 and r4 = h * sum_i d_i k_i, where
    # dy = h * sum_i b_i k_i. Every r is linear in h*k_i, so each stage gets a polynomial.
    d = np.array(
        [
            -12715105075.0 / 11282082432.0,
            0.0,
            87487479700.0 / 32700410799.0,
            -10690763975.0 / 1880347072.0,
            701980252875.0 / 199316789632.0,
            -1453857185.0 / 822651844.0,
            69997945.0 / 29380423.0,
        ]
    )
    b_vec = np.asarray(b)

    e1 = np.eye(7)[0]
    e7 = np.eye(7)[6]
    r1 = b_vec
    r2 = e1 - b_vec
    r3 = 2.0 * b_vec - e1 - e7
    r4 = d

    theta = [0.0, 1.0]
    one_minus = [1.0, -1.0]
    basis = [
        _pad(_poly(theta), 5),
        _pad(_poly(theta, one_minus), 5),
        _pad(_poly(theta, one_minus, theta), 5),
        _pad(_poly(theta, one_minus, theta, one_minus), 5),
    ]
    return (
        np.outer(r1, basis[0])
        + np.outer(r2, basis[1])
        + np.outer(r3, basis[2])
        + np.outer(r4, basis[3])
    )


_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)

TSIT5 = ExplicitRKTableau(
    name="tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    b_error=(
        -0.00178001105222577714,
        -0.0008164344596567469,
        0.007880878010261995,
        -0.1447110071732629,
        0.5823571654525552,
        -0.45808210592918697,
        1.0 / 66.0,
    ),
    interpolation=_tsit5_interpolation(),
    order=5,
    error_order=4,
    # Left end of the real stability interval; the boundary computed from the tableau is 3.50692.
    stability_region_size=3.5068,
)

_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)

DOPRI5 = ExplicitRKTableau(
    name="dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    b_error=(
        71 / 57600,
        0.0,
        -71 / 16695,
        71 / 1920,
        -17253 / 339200,
        22 / 525,
        -1 / 40,
    ),
    interpolation=_dopri5_interpolation(_DOPRI5_B),
    order=5,
    error_order=4,
    # Left end of the real stability interval; the boundary computed from the tableau is 3.30665.
    stability_region_size=3.3066,
)

TABLEAUS: dict[str, ExplicitRKTableau] = {tableau.name: tableau for tableau in (TSIT5, DOPRI5)}


def get_tableau(method: str) -> ExplicitRKTableau:
    """Look up a tableau by method name (case-insensitive).

    Raises:
        TypeError: If ``method`` is not a string.
        ValueError: If the method is unknown; the message suggests the closest known name.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'tsit5', got {method!r}.")
    tableau = TABLEAUS.get(method.lower())
    if tableau is None:
        close = difflib.get_close_matches(method.lower(), TABLEAUS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown method {method!r}; use one of {sorted(TABLEAUS)}.{hint}")
    return tableau


def stability_region_size(method: str) -> float:
    """Return the length of the real stability interval ``[-size, 0]`` of ``method``.

    ``h * |lambda|`` must stay below this size for the explicit method to be stable on
    ``y' = lambda * y`` with real ``lambda < 0``, so SRNODE divides stiffness estimates by it.
    """
    return get_tableau(method).stability_region_size


@dataclass(frozen=True)
class TableauTensors:
    """A tableau's coefficients as tensors of one dtype and device, built once and cached.

    Attributes:
        c: Stage times as fractions of the step, ``[s]``.
        a21: Weight of the first stage in the second stage's input.
        a_rows: Row ``i`` of ``a`` as a ``[1, i]`` matrix, for stages ``2 .. s-2``; entries 0 and
            1 (and ``s - 1``) are ``None``.
        final_weights: ``[3, s - 1]`` weights applied to stages ``1 .. s-1`` in one product:
            the new state (row ``s - 1`` of ``a``), the error estimate without the FSAL stage
            (``b_error[:-1]``) and the gap between the last two stage inputs.
        b_error_last: ``b_error`` of the FSAL stage.
        interpolation_t: Transposed dense-output coefficients, ``[degree + 1, s]``.
    """

    c: Tensor
    a21: float
    a_rows: tuple[Tensor | None, ...]
    final_weights: Tensor
    b_error_last: float
    interpolation_t: Tensor


@cache
def tableau_tensors(method: str, dtype: torch.dtype, device: torch.device) -> TableauTensors:
    """Convert the coefficients of ``method`` to tensors (cached per dtype and device)."""
    tableau = get_tableau(method)
    n_stages = tableau.n_stages

    def as_tensor(values: object) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    a_rows: list[Tensor | None] = [None, None]
    a_rows += [as_tensor([tableau.a[i]]) for i in range(2, n_stages - 1)]
    a_rows.append(None)
    new_state = np.asarray(tableau.a[n_stages - 1])
    before_last = _pad(np.asarray(tableau.a[n_stages - 2]), n_stages - 1)
    final_weights = np.stack([new_state, np.asarray(tableau.b_error[:-1]), new_state - before_last])
    return TableauTensors(
        c=as_tensor(tableau.c),
        a21=float(tableau.a[1][0]),
        a_rows=tuple(a_rows),
        final_weights=as_tensor(final_weights),
        b_error_last=float(tableau.b_error[-1]),
        interpolation_t=as_tensor(tableau.interpolation.T.copy()),
    )
