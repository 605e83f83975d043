"""Implicit differentiation: gradcheck, closed forms and the Jacobian-precision bound."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.optlayers import implicit_fixed_point, implicit_jacobian, implicit_root, root_vjp
from zoo.optlayers.conditions import (
    kkt_conditions,
    mirror_descent_simplex_fixed_point,
    projected_gradient_fixed_point,
    proximal_gradient_fixed_point,
    stationarity,
)
from zoo.optlayers.linear_solve import SOLVERS
from zoo.optlayers.projections import projection_box, projection_simplex, prox_l1

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def single_thread():
    """Run with one intra-op thread: the solvers' many tiny batched operations get slower,
    not faster, from thread synchronization on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def regression():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=generator, dtype=DTYPE)
    y = torch.randn(40, generator=generator, dtype=DTYPE)
    return X, y


def ridge_objective(X, y):
    def objective(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()

    return objective


def ridge_closed_form(X, y, lam):
    return torch.linalg.solve(
        X.T @ X + torch.diag(lam * torch.ones(X.shape[1], dtype=DTYPE)), X.T @ y
    )


@pytest.mark.parametrize("solve", sorted(SOLVERS))
def test_ridge_gradcheck_every_solver(regression, solve):
    X, y = regression

    @implicit_root(stationarity(ridge_objective(X, y)), solve=solve, tol=1e-12)
    def solver(init_w, lam):
        return ridge_closed_form(X, y, lam)

    lam = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    lam = lam.add(0.5).requires_grad_()
    init = torch.zeros(6, dtype=DTYPE)
    # Iterative solvers are not bitwise reproducible across calls (threaded reductions), so
    # repeated backward passes may differ by rounding.
    assert torch.autograd.gradcheck(lambda t: solver(init, t), (lam,), nondet_tol=1e-12)


def test_ridge_hypergradient_matches_closed_form(regression):
    X, y = regression
    X_val, y_val = X[:10] * 0.5 + 0.1, y[:10] * 2.0

    @implicit_root(stationarity(ridge_objective(X, y)), solve="cg", tol=1e-12)
    def solver(init_w, lam):
        # A deliberately inexact iterative solver: gradient descent to high accuracy.
        w = init_w
        hessian = X.T @ X + torch.diag(lam * torch.ones(6, dtype=DTYPE))
        step = 1.0 / torch.linalg.eigvalsh(hessian).max()
        for _ in range(3000):
            w = w - step * (hessian @ w - X.T @ y)
        return w

    lam = torch.full((6,), 2.0, dtype=DTYPE, requires_grad=True)
    w = solver(torch.zeros(6, dtype=DTYPE), lam)
    val_loss = 0.5 * ((X_val @ w - y_val) ** 2).sum()
    (implicit,) = torch.autograd.grad(val_loss, lam)

    # Closed form: dL/dlam_j = -w_j * [H^{-1} X_valᵀ(X_val w - y_val)]_j.
    w_exact = ridge_closed_form(X, y, lam.detach())
    hessian = X.T @ X + 2.0 * torch.eye(6, dtype=DTYPE)
    adjoint = torch.linalg.solve(hessian, X_val.T @ (X_val @ w_exact - y_val))
    closed_form = -w_exact * adjoint
    assert torch.allclose(implicit, closed_form, atol=1e-6, rtol=0)


def test_batched_problems_with_two_parameters():
    generator = torch.Generator().manual_seed(1)
    batch, n = 4, 3
    matrices = torch.randn(batch, n, n, generator=generator, dtype=DTYPE)
    hessians = matrices @ matrices.transpose(-1, -2) + torch.eye(n, dtype=DTYPE)

    def objective(x, h, c):
        return (
            0.5 * (x * (hessians @ x.unsqueeze(-1)).squeeze(-1)).sum(-1) - (c * x).sum(-1)
        ).sum() + (h * x * x).sum()

    @implicit_root(stationarity(objective), solve="cg", tol=1e-12, batch_dims=1)
    def solver(init_x, h, c):
        return torch.linalg.solve(hessians + torch.diag_embed(2 * h), c)

    h = torch.rand(batch, n, dtype=DTYPE).requires_grad_()
    c = torch.randn(batch, n, dtype=DTYPE).requires_grad_()
    init = torch.zeros(batch, n, dtype=DTYPE)
    assert torch.autograd.gradcheck(lambda a, b: solver(init, a, b), (h, c))


def test_softmax_from_entropic_projection():
    theta = torch.randn(3, 5, dtype=DTYPE, requires_grad=True)

    def objective(p, scores):
        # Negative entropy regularized linear objective; its minimizer on the simplex is
        # softmax(scores).
        return (-(p * scores).sum(-1) + (p * torch.log(p)).sum(-1)).sum()

    fixed_point_map = mirror_descent_simplex_fixed_point(objective, step_size=0.5)

    @implicit_fixed_point(fixed_point_map, solve="gmres", tol=1e-12)
    def solver(init_p, scores):
        p = init_p
        for _ in range(200):
            p = fixed_point_map(p, scores)
        return p

    init = torch.full((3, 5), 0.2, dtype=DTYPE)
    p = solver(init, theta)
    assert torch.allclose(p, torch.softmax(theta, -1), atol=1e-10)
    cotangent = torch.randn(3, 5, dtype=DTYPE)
    (implicit,) = torch.autograd.grad(p, theta, cotangent)
    (exact,) = torch.autograd.grad(torch.softmax(theta, -1), theta, cotangent)
    assert torch.allclose(implicit, exact, atol=1e-8)


def test_projected_gradient_box_matches_finite_differences():
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(6, generator=generator, dtype=DTYPE) * 2

    def objective(x, center, upper):
        return 0.5 * ((x - center) ** 2).sum()

    fixed_point_map = projected_gradient_fixed_point(
        objective, lambda y, center, upper: projection_box(y, -1.0, upper), step_size=0.5
    )

    @implicit_fixed_point(fixed_point_map, solve="dense")
    def solver(init_x, center, upper):
        return projection_box(center, -1.0, upper)

    center = target.clone().requires_grad_()
    upper = torch.full((6,), 1.2, dtype=DTYPE, requires_grad=True)
    init = torch.zeros(6, dtype=DTYPE)
    assert torch.autograd.gradcheck(lambda a, b: solver(init, a, b), (center, upper))


def test_proximal_gradient_lasso_gradcheck():
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(30, 5, generator=generator, dtype=DTYPE)
    y = X @ torch.tensor([1.5, 0.0, -2.0, 0.0, 0.7], dtype=DTYPE) + 0.1 * torch.randn(
        30, generator=generator, dtype=DTYPE
    )
    step = float(1.0 / torch.linalg.eigvalsh(X.T @ X).max())

    def objective(w, strength):
        return 0.5 * ((X @ w - y) ** 2).sum()

    fixed_point_map = proximal_gradient_fixed_point(
        objective, lambda v, eta, strength: prox_l1(v, eta * strength), step_size=step
    )

    @implicit_fixed_point(fixed_point_map, solve="dense", ridge=0.0)
    def solver(init_w, strength):
        w = init_w
        for _ in range(1500):
            w = fixed_point_map(w, strength)
        return w.detach()

    strength = torch.tensor(3.0, dtype=DTYPE, requires_grad=True)
    init = torch.zeros(5, dtype=DTYPE)
    w = solver(init, strength)
    assert (w == 0).sum() >= 1, "the test needs an inactive coordinate"
    assert torch.autograd.gradcheck(lambda s: solver(init, s), (strength,), atol=1e-6)


def test_kkt_conditions_simplex_projection():
    n = 5
    y = torch.tensor([0.8, 0.1, -0.3, 0.6, 0.05], dtype=DTYPE, requires_grad=True)

    def objective(x, target):
        return 0.5 * ((x - target) ** 2).sum()

    optimality = kkt_conditions(
        objective,
        num_primal=n,
        equality=lambda x, target: x.sum(-1, keepdim=True) - 1.0,
        inequality=lambda x, target: -x,
        num_equality=1,
    )

    @implicit_root(optimality, solve="dense")
    def solver(init_z, target):
        x = projection_simplex(target.detach())
        tau = (target - x)[x > 0].mean()
        lam = torch.clamp(tau - target, min=0.0) * (x == 0)
        return torch.cat([x, tau.reshape(1), lam])

    init = torch.zeros(2 * n + 1, dtype=DTYPE)
    z = solver(init, y)
    assert torch.allclose(optimality(z, y), torch.zeros_like(z), atol=1e-12)
    cotangent = torch.randn(n, dtype=DTYPE)
    (implicit,) = torch.autograd.grad(z[:n], y, cotangent)
    (exact,) = torch.autograd.grad(projection_simplex(y), y, cotangent)
    assert torch.allclose(implicit, exact, atol=1e-10)


def test_jacobian_error_linear_in_solution_error():
    generator = torch.Generator().manual_seed(4)
    X = torch.randn(50, 4, generator=generator, dtype=DTYPE)
    labels = (torch.rand(50, generator=generator, dtype=DTYPE) > 0.5).to(DTYPE)

    def objective(w, lam):
        logits = X @ w
        return (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            + 0.5 * (lam * w * w).sum()
        )

    optimality = stationarity(objective)
    lam = torch.full((4,), 0.5, dtype=DTYPE)
    w = torch.zeros(4, dtype=DTYPE)
    for _ in range(50):  # Newton's method to machine precision
        hessian = torch.autograd.functional.hessian(lambda v: objective(v, lam), w)
        w = w - torch.linalg.solve(hessian, optimality(w, lam).detach())
    exact = implicit_jacobian(optimality, w, (lam,), 0)
    direction = torch.randn(4, generator=generator, dtype=DTYPE)
    direction = direction / direction.norm()
    sizes = [1e-2, 1e-3, 1e-4, 1e-5]
    errors = [
        (implicit_jacobian(optimality, w + size * direction, (lam,), 0) - exact).norm().item()
        for size in sizes
    ]
    slope = (math.log(errors[0]) - math.log(errors[-1])) / (
        math.log(sizes[0]) - math.log(sizes[-1])
    )
    assert 0.9 < slope < 1.1


def test_root_vjp_rejects_bad_shapes(regression):
    X, y = regression
    optimality = stationarity(ridge_objective(X, y))
    w = torch.zeros(6, dtype=DTYPE)
    with pytest.raises(ValueError, match="cotangent shape"):
        root_vjp(optimality, w, (torch.ones(6, dtype=DTYPE),), torch.zeros(5, dtype=DTYPE))
    with pytest.raises(ValueError, match="Unknown linear solver 'lu'"):
        implicit_root(optimality, solve="lu")
    with pytest.raises(ValueError, match="ridge must be non-negative"):
        implicit_root(optimality, ridge=-1.0)


def test_ridge_regularizes_singular_system():
    # F(x, theta) = P x - theta with P a rank-deficient projector: singular without ridge.
    P = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=DTYPE))
    theta = torch.tensor([0.5, -1.0, 0.0], dtype=DTYPE, requires_grad=True)

    @implicit_root(lambda x, t: P @ x - t, solve="cg", ridge=1e-8, tol=1e-12)
    def solver(init_x, t):
        return t.clone()

    x = solver(torch.zeros(3, dtype=DTYPE), theta)
    (grad,) = torch.autograd.grad(x.sum(), theta)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad[:2], torch.ones(2, dtype=DTYPE), atol=1e-6)
