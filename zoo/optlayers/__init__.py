"""Differentiable optimization layers: implicit differentiation and convex layers.

- :mod:`zoo.optlayers.implicit`: ``implicit_root`` / ``implicit_fixed_point`` decorators.
- :mod:`zoo.optlayers.linear_solve`: CG, normal CG, BiCGSTAB, GMRES and dense adjoint solvers.
- :mod:`zoo.optlayers.conditions`: optimality conditions (stationarity, projected and
  proximal gradient, mirror descent, KKT).
- :mod:`zoo.optlayers.projections`: projections (box, simplex, L2 ball, orthant), sparsemax.
- :mod:`zoo.optlayers.qp`: the zoo's batched QP layer (interior point + KKT gradients).
- :mod:`zoo.optlayers.cvxpy_layer`: a validated wrapper around cvxpylayers.
"""

from zoo.optlayers.implicit import implicit_fixed_point, implicit_jacobian, implicit_root, root_vjp
from zoo.optlayers.qp import QPLayer, QPSolution, solve_qp_batch

__all__ = [
    "QPLayer",
    "QPSolution",
    "implicit_fixed_point",
    "implicit_jacobian",
    "implicit_root",
    "root_vjp",
    "solve_qp_batch",
]
