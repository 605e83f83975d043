"""Matrix-free linear solvers for the adjoint systems of implicit differentiation.

Every solver takes a linear operator ``matvec`` (a function from tensors of the shape of
``b`` to tensors of the same shape) and a right-hand side ``b``, and returns ``x`` with
``matvec(x) ≈ b``. The leading ``batch_dims`` dimensions of ``b`` index independent systems
whose operator is block diagonal, so CG and BiCGSTAB use per-system step sizes and stop
when every system has converged. ``ridge`` adds ``ridge * x`` to the operator that the
solver iterates on (for normal CG that is the normal operator ``MᵀM``, not ``M``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

MatVec = Callable[[torch.Tensor], torch.Tensor]
LinearSolver = Callable[..., torch.Tensor]


def _dot(a: torch.Tensor, b: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Inner products over the non-batch dimensions, shaped to broadcast against ``a``."""
    reduce_dims = tuple(range(batch_dims, a.dim()))
    if not reduce_dims:
        return a * b
    return (a * b).sum(dim=reduce_dims, keepdim=True)


def _with_ridge(matvec: MatVec, ridge: float) -> MatVec:
    if ridge == 0.0:
        return matvec
    return lambda v: matvec(v) + ridge * v


def _check_common(
    b: torch.Tensor, tol: float, maxiter: int | None, ridge: float, batch_dims: int
) -> None:
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}.")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    if maxiter is not None and maxiter < 1:
        raise ValueError(f"maxiter must be at least 1 or None, got {maxiter}.")
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}.")
    if not 0 <= batch_dims <= b.dim():
        raise ValueError(f"batch_dims must be between 0 and b.dim()={b.dim()}, got {batch_dims}.")


def solve_cg(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
) -> torch.Tensor:
    """Solve ``A x = b`` by conjugate gradients for a symmetric positive-definite ``A``.

    Args:
        matvec: The operator ``v -> A v``.
        b: Right-hand side; its leading ``batch_dims`` dimensions index independent systems.
        x0: Initial guess (zeros by default).
        tol: Stop when ``||r|| <= tol * ||b||`` holds for every system.
        maxiter: Maximum number of iterations; defaults to ``10 * size`` of one system.
        ridge: Adds ``ridge * I`` to ``A``.
        batch_dims: Number of leading dimensions of ``b`` that index independent systems.

    Returns:
        The approximate solution, shaped like ``b``.
    """
    _check_common(b, tol, maxiter, ridge, batch_dims)
    operator = _with_ridge(matvec, ridge)
    size = b[(0,) * batch_dims].numel() if batch_dims else b.numel()
    maxiter = maxiter if maxiter is not None else 10 * max(size, 1)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - operator(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = _dot(r, r, batch_dims)
    threshold = (tol**2) * _dot(b, b, batch_dims)
    for _ in range(maxiter):
        if bool((rr <= threshold).all()):
            break
        ap = operator(p)
        denominator = _dot(p, ap, batch_dims)
        # Converged systems keep a zero step instead of dividing 0 by 0.
        alpha = torch.where(rr > threshold, rr / denominator.where(denominator != 0, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r, batch_dims)
        beta = rr_new / rr.where(rr != 0, 1.0)
        p = r + beta * p
        rr = rr_new
    return x


def solve_normal_cg(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
) -> torch.Tensor:
    """Solve ``M x = b`` for any square ``M`` by CG on the normal equations ``MᵀM x = Mᵀb``.

    ``Mᵀ`` is obtained by differentiating ``matvec`` with autograd, so ``matvec`` must be
    differentiable (build it with ``create_graph=True`` when it is itself a VJP). The normal
    equations square the condition number; prefer :func:`solve_cg` for symmetric ``M``.
    Arguments are as in :func:`solve_cg`; ``ridge`` is added to ``MᵀM``.
    """
    _check_common(b, tol, maxiter, ridge, batch_dims)

    def transpose_matvec(w: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            probe = torch.zeros_like(w, requires_grad=True)
            (result,) = torch.autograd.grad(matvec(probe), probe, w, create_graph=False)
        return result

    rhs = transpose_matvec(b)
    return solve_cg(
        lambda v: transpose_matvec(matvec(v)),
        rhs,
        x0=x0,
        tol=tol,
        maxiter=maxiter,
        ridge=ridge,
        batch_dims=batch_dims,
    )


def solve_bicgstab(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
) -> torch.Tensor:
    """Solve ``A x = b`` for a non-symmetric ``A`` by BiCGSTAB (van der Vorst, 1992).

    Arguments are as in :func:`solve_cg`.
    """
    _check_common(b, tol, maxiter, ridge, batch_dims)
    operator = _with_ridge(matvec, ridge)
    size = b[(0,) * batch_dims].numel() if batch_dims else b.numel()
    maxiter = maxiter if maxiter is not None else 10 * max(size, 1)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - operator(x) if x0 is not None else b.clone()
    r_hat = r.clone()
    rho = alpha = omega = torch.ones_like(_dot(r, r, batch_dims))
    v = torch.zeros_like(b)
    p = torch.zeros_like(b)
    threshold = (tol**2) * _dot(b, b, batch_dims)

    def safe(value: torch.Tensor) -> torch.Tensor:
        return value.where(value != 0, 1.0)

    for _ in range(maxiter):
        active = _dot(r, r, batch_dims) > threshold
        if not bool(active.any()):
            break
        rho_new = _dot(r_hat, r, batch_dims)
        beta = (rho_new / safe(rho)) * (alpha / safe(omega))
        p = r + beta * (p - omega * v)
        v = operator(p)
        alpha = torch.where(active, rho_new / safe(_dot(r_hat, v, batch_dims)), 0.0)
        s = r - alpha * v
        t = operator(s)
        omega = torch.where(active, _dot(t, s, batch_dims) / safe(_dot(t, t, batch_dims)), 0.0)
        x = x + alpha * p + omega * s
        r = s - omega * t
        rho = rho_new
    return x


def solve_gmres(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-5,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
    restart: int = 30,
) -> torch.Tensor:
    """Solve ``A x = b`` for a non-symmetric ``A`` by restarted GMRES (Saad and Schultz, 1986).

    The batch is solved as one block-diagonal system. ``batch_dims`` is therefore accepted
    but unused, and the stopping rule uses the norm of the whole residual.

    Args:
        matvec: The operator ``v -> A v``.
        b: Right-hand side.
        x0: Initial guess (zeros by default).
        tol: Stop when ``||r|| <= tol * ||b||``.
        maxiter: Maximum number of restart cycles; defaults to ``size // restart + 10``.
        ridge: Adds ``ridge * I`` to ``A``.
        batch_dims: Accepted for a uniform interface and unused.
        restart: Krylov subspace dimension per cycle.
    """
    _check_common(b, tol, maxiter, ridge, batch_dims)
    if restart < 1:
        raise ValueError(f"restart must be at least 1, got {restart}.")
    operator = _with_ridge(matvec, ridge)
    shape = b.shape
    n = b.numel()
    restart = min(restart, n)
    maxiter = maxiter if maxiter is not None else n // restart + 10
    x = torch.zeros(n, dtype=b.dtype, device=b.device) if x0 is None else x0.reshape(-1).clone()
    b_flat = b.reshape(-1)
    b_norm = torch.linalg.vector_norm(b_flat)
    if b_norm == 0:
        return torch.zeros_like(b)

    def op(v: torch.Tensor) -> torch.Tensor:
        return operator(v.reshape(shape)).reshape(-1)

    for _ in range(maxiter):
        r = b_flat - op(x)
        beta = torch.linalg.vector_norm(r)
        if beta <= tol * b_norm:
            break
        basis = [r / beta]
        hessenberg = torch.zeros(restart + 1, restart, dtype=b.dtype, device=b.device)
        k_used = 0
        for k in range(restart):
            w = op(basis[k])
            # Modified Gram-Schmidt keeps the Krylov basis orthonormal in floating point.
            for i in range(k + 1):
                hessenberg[i, k] = torch.dot(basis[i], w)
                w = w - hessenberg[i, k] * basis[i]
            hessenberg[k + 1, k] = torch.linalg.vector_norm(w)
            k_used = k + 1
            if hessenberg[k + 1, k] <= 1e-14 * beta:
                break
            basis.append(w / hessenberg[k + 1, k])
        rhs = torch.zeros(k_used + 1, dtype=b.dtype, device=b.device)
        rhs[0] = beta
        coefficients = torch.linalg.lstsq(
            hessenberg[: k_used + 1, :k_used], rhs.unsqueeze(-1)
        ).solution.squeeze(-1)
        x = x + torch.stack(basis[:k_used], dim=1) @ coefficients
    return x.reshape(shape)


def materialize(matvec: MatVec, like: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """Build the dense matrix of a (block-diagonal) linear operator by probing basis vectors.

    Returns:
        A tensor of shape ``batch_shape + (size, size)`` where ``size`` is the number of
        elements of one system; with ``batch_dims=0`` the batch shape is empty.
    """
    batch_shape = like.shape[:batch_dims]
    item_shape = like.shape[batch_dims:]
    size = item_shape.numel()
    columns = []
    for j in range(size):
        basis = torch.zeros(batch_shape + (size,), dtype=like.dtype, device=like.device)
        basis[..., j] = 1.0
        columns.append(matvec(basis.reshape(like.shape)).reshape(batch_shape + (size,)))
    return torch.stack(columns, dim=-1)


def solve_dense(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    ridge: float = 0.0,
    batch_dims: int = 0,
) -> torch.Tensor:
    """Solve ``A x = b`` by LU after materializing ``A`` with one matvec per column.

    The result is exact up to rounding, and the solve is fast for systems of up to a few
    hundred unknowns each. ``x0``, ``tol`` and ``maxiter`` are accepted for a uniform
    interface and ignored.
    """
    del x0, maxiter
    _check_common(b, tol, None, ridge, batch_dims)
    matrix = materialize(matvec, b, batch_dims)
    if ridge:
        matrix = matrix + ridge * torch.eye(matrix.shape[-1], dtype=b.dtype, device=b.device)
    batch_shape = b.shape[:batch_dims]
    rhs = b.reshape(batch_shape + (-1, 1))
    return torch.linalg.solve(matrix, rhs).reshape(b.shape)


SOLVERS: dict[str, LinearSolver] = {
    "cg": solve_cg,
    "normal_cg": solve_normal_cg,
    "bicgstab": solve_bicgstab,
    "gmres": solve_gmres,
    "dense": solve_dense,
}


def get_linear_solver(solve: str | LinearSolver) -> LinearSolver:
    """Return the solver registered under ``solve``, or ``solve`` itself if it is callable."""
    if callable(solve):
        return solve
    if solve not in SOLVERS:
        raise ValueError(
            f"Unknown linear solver {solve!r}; expected one of {sorted(SOLVERS)} or a callable "
            "solve(matvec, b, *, tol, maxiter, ridge, batch_dims)."
        )
    return SOLVERS[solve]
