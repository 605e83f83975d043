"""Implicit differentiation of solvers through their optimality conditions.

A solver ``x* = solver(init_x, *theta)`` is made differentiable by an optimality function
``F`` with ``F(x*, *theta) = 0``. By the implicit function theorem, with
``A = ∂F/∂x`` and ``B = ∂F/∂theta`` at ``x*``, the Jacobian is ``dx*/dtheta = -A⁻¹B``.
The backward pass never forms it. Given the cotangent ``v = dL/dx*`` it solves the adjoint
system ``Aᵀu = -v`` with a matrix-free linear solver whose matvec ``u -> Aᵀu`` is an autograd
vector-Jacobian product of ``F``, and returns ``dL/dtheta = Bᵀu``, one more VJP. The cost is
one linear solve per backward pass, whatever the number or size of the parameters, and it
does not depend on how ``x*`` was computed. The method follows Blondel et al.,
"Efficient and Modular Implicit Differentiation", NeurIPS 2022.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from zoo.optlayers.linear_solve import LinearSolver, get_linear_solver, materialize

logger = logging.getLogger(__name__)

OptimalityFn = Callable[..., torch.Tensor]


def _is_differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _check_solver_options(tol: float, maxiter: int | None, ridge: float, batch_dims: int) -> None:
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    if maxiter is not None and maxiter < 1:
        raise ValueError(f"maxiter must be at least 1 or None, got {maxiter}.")
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}.")
    if batch_dims < 0:
        raise ValueError(f"batch_dims must be non-negative, got {batch_dims}.")


def root_vjp(
    optimality_fn: OptimalityFn,
    x_star: torch.Tensor,
    args: Sequence[Any],
    cotangent: torch.Tensor,
    *,
    solve: str | LinearSolver = "normal_cg",
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
) -> tuple[torch.Tensor | None, ...]:
    """Return ``dL/dargs`` for every argument of ``optimality_fn`` after ``x``.

    Args:
        optimality_fn: ``F(x, *args)``, zero at the solution and shaped like ``x``.
        x_star: The solution (detached or not; it is detached here).
        args: The parameters ``theta``; non-tensor entries are passed through.
        cotangent: ``dL/dx*``, shaped like ``x_star``.
        solve: Name of a solver in :data:`zoo.optlayers.linear_solve.SOLVERS` or a callable.
        tol: Relative tolerance of the adjoint solve.
        maxiter: Iteration limit of the adjoint solve (solver default if None).
        ridge: Added to the adjoint operator to regularize singular systems.
        batch_dims: Leading dimensions of ``x_star`` that index independent problems.

    Returns:
        One entry per element of ``args``: the gradient, or None where the argument is not a
        floating-point tensor or ``F`` does not depend on it.
    """
    _check_solver_options(tol, maxiter, ridge, batch_dims)
    if cotangent.shape != x_star.shape:
        raise ValueError(
            f"cotangent shape {tuple(cotangent.shape)} must equal the solution shape "
            f"{tuple(x_star.shape)}."
        )
    solver = get_linear_solver(solve)
    # Normal CG transposes the matvec with autograd, so the matvec must keep its graph.
    create_graph = solver is get_linear_solver("normal_cg")
    x = x_star.detach().requires_grad_(True)
    theta = [a.detach().requires_grad_(True) if _is_differentiable(a) else a for a in args]
    with torch.enable_grad():
        residual = optimality_fn(x, *theta)
        if residual.shape != x.shape:
            raise ValueError(
                f"optimality_fn returned shape {tuple(residual.shape)}, but it must have the "
                f"shape of x, {tuple(x.shape)}, so that dF/dx is square."
            )

        def adjoint_matvec(u: torch.Tensor) -> torch.Tensor:
            (product,) = torch.autograd.grad(
                residual, x, u, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            return torch.zeros_like(u) if product is None else product

        u = solver(
            adjoint_matvec,
            -cotangent.detach(),
            tol=tol,
            maxiter=maxiter,
            ridge=ridge,
            batch_dims=batch_dims,
        )
        differentiable = [t for t in theta if _is_differentiable(t)]
        if not differentiable:
            return tuple(None for _ in args)
        grads = iter(torch.autograd.grad(residual, differentiable, u.detach(), allow_unused=True))
    return tuple(next(grads) if _is_differentiable(t) else None for t in theta)


def implicit_jacobian(
    optimality_fn: OptimalityFn,
    x_star: torch.Tensor,
    args: Sequence[Any],
    argnum: int,
    *,
    ridge: float = 0.0,
) -> torch.Tensor:
    """Materialize ``dx*/dargs[argnum] = -A⁻¹B`` densely; for checks and small problems.

    Returns:
        A tensor of shape ``x_star.shape + args[argnum].shape``.
    """
    if not 0 <= argnum < len(args) or not _is_differentiable(args[argnum]):
        raise ValueError(
            f"argnum={argnum} must index a floating-point tensor among the {len(args)} args."
        )
    x = x_star.detach()
    theta = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]

    def f_of_x(z: torch.Tensor) -> torch.Tensor:
        return optimality_fn(z, *theta)

    def f_of_theta(t: torch.Tensor) -> torch.Tensor:
        values = list(theta)
        values[argnum] = t
        return optimality_fn(x, *values)

    size = x.numel()
    a_matrix = torch.autograd.functional.jacobian(f_of_x, x).reshape(size, size)
    b_matrix = torch.autograd.functional.jacobian(f_of_theta, theta[argnum]).reshape(size, -1)
    if ridge:
        a_matrix = a_matrix + ridge * torch.eye(size, dtype=x.dtype, device=x.device)
    jacobian = -torch.linalg.solve(a_matrix, b_matrix)
    return jacobian.reshape(x.shape + theta[argnum].shape)


class _ImplicitFunction(torch.autograd.Function):
    """Runs the solver without a graph and differentiates its output with :func:`root_vjp`."""

    @staticmethod
    def forward(ctx: Any, config: dict[str, Any], init_x: torch.Tensor, *args: Any):
        detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        # The solver may use autograd internally (for gradients of an objective), but no
        # input requires grad here, so no graph of its iterations is recorded.
        with torch.enable_grad():
            output = config["solver_fn"](init_x.detach(), *detached)
        if config["has_aux"]:
            x_star, aux = output
            config["aux"] = aux
        else:
            x_star = output
        if not isinstance(x_star, torch.Tensor):
            raise TypeError(
                f"The solver must return a tensor (or (tensor, aux) with has_aux=True), "
                f"got {type(x_star).__name__}."
            )
        x_star = x_star.detach()
        ctx.config = config
        ctx.args = detached
        ctx.save_for_backward(x_star)
        return x_star

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):
        (x_star,) = ctx.saved_tensors
        config = ctx.config
        grads = root_vjp(
            config["optimality_fn"],
            x_star,
            ctx.args,
            grad_output,
            solve=config["solve"],
            tol=config["tol"],
            maxiter=config["maxiter"],
            ridge=config["ridge"],
            batch_dims=config["batch_dims"],
        )
        # No gradient for the config and for the initial point: x* does not depend on it.
        return (None, None, *grads)


def implicit_root(
    optimality_fn: OptimalityFn,
    *,
    solve: str | LinearSolver = "normal_cg",
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``solver_fn(init_x, *theta) -> x*`` differentiable through ``F(x*, *theta) = 0``.

    The solver runs without recording a graph, so memory does not grow with its iteration
    count. The backward pass is not itself differentiable (no higher-order derivatives).
    ``theta`` is positional only and is passed to ``optimality_fn`` in the same order.

    Args:
        optimality_fn: ``F(x, *theta)``, shaped like ``x`` and zero at the solution.
        solve: Adjoint linear solver: ``"cg"`` (symmetric positive-definite ``∂F/∂x`` such as
            a Hessian), ``"normal_cg"`` (any square ``∂F/∂x``), ``"gmres"``, ``"bicgstab"``
            (non-symmetric) or ``"dense"`` (materializes ``∂F/∂x``; small problems).
        tol: Relative tolerance of the adjoint solve.
        maxiter: Iteration limit of the adjoint solve (solver default if None).
        ridge: Ridge term for singular or near-singular ``∂F/∂x``.
        batch_dims: Leading dimensions of ``x`` that index independent problems.
        has_aux: The solver returns ``(x*, aux)``; ``aux`` is returned as is, undifferentiated.

    Example::

        def stationarity(w, lam):
            return X.T @ (X @ w - y) + lam * w

        @implicit_root(stationarity, solve="cg")
        def ridge_solver(init_w, lam):
            return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1]), X.T @ y)
    """
    get_linear_solver(solve)
    _check_solver_options(tol, maxiter, ridge, batch_dims)

    def decorator(solver_fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver_fn)
        def wrapped(init_x: torch.Tensor, *theta: Any) -> Any:
            if not isinstance(init_x, torch.Tensor):
                raise TypeError(f"init_x must be a torch.Tensor, got {type(init_x).__name__}.")
            config = {
                "solver_fn": solver_fn,
                "optimality_fn": optimality_fn,
                "solve": solve,
                "tol": tol,
                "maxiter": maxiter,
                "ridge": ridge,
                "batch_dims": batch_dims,
                "has_aux": has_aux,
            }
            x_star = _ImplicitFunction.apply(config, init_x, *theta)
            return (x_star, config["aux"]) if has_aux else x_star

        return wrapped

    return decorator


def implicit_fixed_point(
    fixed_point_fn: OptimalityFn,
    *,
    solve: str | LinearSolver = "normal_cg",
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Like :func:`implicit_root` for a solver of ``x* = T(x*, *theta)``.

    The optimality function is ``F(x, *theta) = T(x, *theta) - x``, so ``∂F/∂x = ∂T/∂x - I``
    is non-symmetric in general; the default normal CG and GMRES/BiCGSTAB handle it.
    """

    def residual(x: torch.Tensor, *theta: Any) -> torch.Tensor:
        return fixed_point_fn(x, *theta) - x

    return implicit_root(
        residual,
        solve=solve,
        tol=tol,
        maxiter=maxiter,
        ridge=ridge,
        batch_dims=batch_dims,
        has_aux=has_aux,
    )


__all__ = [
    "implicit_fixed_point",
    "implicit_jacobian",
    "implicit_root",
    "materialize",
    "root_vjp",
]
