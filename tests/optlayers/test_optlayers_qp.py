"""The zoo's batched QP layer against cvxpylayers, the generic KKT map and finite differences."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch

from zoo.optlayers import QPLayer, implicit_root
from zoo.optlayers.conditions import qp_kkt_conditions
from zoo.optlayers.cvxpy_layer import ConvexLayer

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def single_thread():
    """Run with one intra-op thread: the solvers' many tiny batched operations get slower,
    not faster, from thread synchronization on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_qp(batch: int, n: int, m: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(batch, n, n, generator=generator, dtype=DTYPE)
    Q = factor @ factor.transpose(-1, -2) / n + torch.eye(n, dtype=DTYPE)
    q = torch.randn(batch, n, generator=generator, dtype=DTYPE)
    G = torch.randn(m, n, generator=generator, dtype=DTYPE)
    h = torch.full((m,), 0.5, dtype=DTYPE)
    return Q, q, G, h


def test_qp_layer_matches_cvxpylayers_solution_and_gradient():
    n, m, batch = 6, 4, 5
    Q, q, G, h = random_qp(batch, n, m)
    root = torch.linalg.cholesky(Q).transpose(-1, -2).contiguous()

    x_var = cp.Variable(n)
    root_param = cp.Parameter((n, n))
    q_param = cp.Parameter(n)
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(root_param @ x_var) + q_param @ x_var),
        [G.numpy() @ x_var <= h.numpy()],
    )
    reference = ConvexLayer(problem, [root_param, q_param], [x_var], solver_args={"eps": 1e-10})
    root_ref = root.clone().requires_grad_()
    q_ref = q.clone().requires_grad_()
    (x_ref,) = reference(root_ref, q_ref)
    weights = torch.randn(batch, n, dtype=DTYPE)
    (x_ref * weights).sum().backward()

    root_ours = root.clone().requires_grad_()
    q_ours = q.clone().requires_grad_()
    x_ours = QPLayer()(root_ours.transpose(-1, -2) @ root_ours, q_ours, G, h)
    (x_ours * weights).sum().backward()

    assert torch.allclose(x_ours, x_ref, atol=1e-5)
    assert torch.allclose(q_ours.grad, q_ref.grad, atol=1e-4)
    assert torch.allclose(root_ours.grad, root_ref.grad, atol=1e-4)


def test_qp_layer_gradcheck_with_equalities():
    Q, q, G, h = random_qp(3, 4, 3, seed=1)
    A = torch.randn(1, 4, dtype=DTYPE, requires_grad=True)
    b = torch.randn(1, dtype=DTYPE, requires_grad=True)
    inputs = (Q.requires_grad_(), q.requires_grad_(), G.requires_grad_(), h.requires_grad_(), A, b)
    layer = QPLayer(tol=1e-12)

    def solve(Q, q, G, h, A, b):
        return layer(0.5 * (Q + Q.transpose(-1, -2)), q, G, h, A, b)

    assert torch.autograd.gradcheck(solve, inputs, atol=1e-5)
    assert layer.last_solution.converged.all()


def test_qp_gradient_matches_generic_kkt_implicit_diff():
    Q, q, G, h = random_qp(4, 5, 3, seed=2)
    layer = QPLayer(tol=1e-12)
    q_ours = q.clone().requires_grad_()
    x = layer(Q, q_ours, G, h)
    solution = layer.last_solution
    cotangent = torch.randn_like(x)
    (grad_ours,) = torch.autograd.grad(x, q_ours, cotangent)

    @implicit_root(qp_kkt_conditions, solve="dense", batch_dims=1)
    def kkt_solver(init_z, Q, q, G, h):
        return torch.cat([solution.x, solution.ineq_dual], -1)

    q_generic = q.clone().requires_grad_()
    z = kkt_solver(torch.zeros(4, 8, dtype=DTYPE), Q, q_generic, G, h)
    (grad_generic,) = torch.autograd.grad(z[:, :5], q_generic, cotangent)
    assert torch.allclose(grad_ours, grad_generic, atol=1e-7)


def test_qp_layer_reports_infeasible_element_by_index():
    Q, q, G, h = random_qp(3, 2, 2, seed=3)
    # Element 1 requires x1 <= -1 and x1 >= 1 at once, so it is infeasible.
    G_batch = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 3, dtype=DTYPE)
    G_batch[1] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DTYPE)
    h_batch = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=DTYPE)
    layer = QPLayer(maxiter=30)
    q = q.requires_grad_()
    x = layer(Q, q, G_batch, h_batch)
    assert layer.last_solution.converged.tolist() == [True, False, True]
    assert torch.isfinite(x[[0, 2]]).all()
    assert torch.equal(x[1], torch.zeros(2, dtype=DTYPE))
    x.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[1], torch.zeros(2, dtype=DTYPE))
    assert q.grad[[0, 2]].abs().sum() > 0
    with pytest.raises(RuntimeError, match=r"batch indices \[1\]"):
        QPLayer(maxiter=30, on_failure="raise")(Q, q, G_batch, h_batch)


def test_qp_layer_rejects_bad_shapes():
    Q, q, G, h = random_qp(2, 3, 2)
    layer = QPLayer()
    with pytest.raises(ValueError, match=r"QP argument G must have shape \(2, 3\)"):
        layer(Q, q, torch.zeros(2, 4, dtype=DTYPE), h)
    with pytest.raises(ValueError, match="different batch sizes"):
        layer(Q, q[:1], G, h)
    with pytest.raises(TypeError, match="QP argument h must be a torch.Tensor"):
        layer(Q, q, G, [0.5, 0.5])
    with pytest.raises(ValueError, match="Pass A and b together"):
        layer(Q, q, G, h, torch.zeros(1, 3, dtype=DTYPE))


def box_projection_problem():
    x = cp.Variable(2)
    target = cp.Parameter(2)
    lower = cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - target)), [cp.sum(x) >= lower, x <= 1])
    return problem, [target, lower], [x]


def test_convex_layer_reports_failed_index_and_keeps_others():
    problem, parameters, variables = box_projection_problem()
    layer = ConvexLayer(problem, parameters, variables)
    target = torch.tensor([[0.2, 0.3], [0.0, 0.0], [2.0, -1.0]], dtype=DTYPE, requires_grad=True)
    # Element 1 needs x1 + x2 >= 5 with x <= 1: infeasible.
    lower = torch.tensor([[0.0], [5.0], [1.0]], dtype=DTYPE)
    (x,) = layer(target, lower)
    assert layer.last_status.failed_indices == [1]
    assert layer.last_status.ok.tolist() == [True, False, True]
    assert torch.allclose(x[0], torch.tensor([0.2, 0.3], dtype=DTYPE), atol=1e-4)
    assert torch.allclose(x[2], torch.tensor([1.0, 0.0], dtype=DTYPE), atol=1e-4)
    assert torch.equal(x[1], torch.zeros(2, dtype=DTYPE))
    x.sum().backward()
    assert torch.isfinite(target.grad).all()
    assert torch.equal(target.grad[1], torch.zeros(2, dtype=DTYPE))


def test_convex_layer_validation_names_parameter():
    problem, parameters, variables = box_projection_problem()
    layer = ConvexLayer(problem, parameters, variables)
    with pytest.raises(
        ValueError, match=r"Parameter param\d+ expects shape \(2,\).*received \(3,\)"
    ):
        layer(torch.zeros(3, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    with pytest.raises(ValueError, match="Expected 2 tensors"):
        layer(torch.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.zeros(3, 2, dtype=DTYPE), torch.zeros(2, 1, dtype=DTYPE))
    x = cp.Variable(1)
    a = cp.Parameter(1)
    not_dpp = cp.Problem(cp.Minimize(cp.sum_squares(cp.multiply(cp.multiply(a, a), x))))
    with pytest.raises(ValueError, match="not DPP-compliant"):
        ConvexLayer(not_dpp, [a], [x])


def test_convex_layer_unbatched_failure_raises():
    problem, parameters, variables = box_projection_problem()
    layer = ConvexLayer(problem, parameters, variables)
    with pytest.raises(RuntimeError, match="solve failed"):
        layer(torch.zeros(2, dtype=DTYPE), torch.tensor([5.0], dtype=DTYPE))


def test_singular_kkt_system_fails_only_its_element():
    # Each bad element makes the interior-point Newton system singular, which used to raise
    # from torch.linalg.lu_factor for the whole batch.
    eye = torch.eye(3, dtype=DTYPE)
    Q = torch.stack([eye, eye, torch.zeros(3, 3, dtype=DTYPE), eye])
    q = torch.ones(4, 3, dtype=DTYPE, requires_grad=True)
    ones = torch.ones(1, 3, dtype=DTYPE)
    G = torch.stack([torch.cat([ones, -ones])] * 4)
    h = torch.tensor([[0.5, 0.5], [-1.0, -1.0], [0.5, 0.5], [0.5, 0.5]], dtype=DTYPE)
    # Element 1: sum(x) <= -1 and sum(x) >= 1. Element 2: Q = 0 and the equality x0 = 0
    # twice, so the KKT matrix has dependent rows although the problem is feasible.
    # Element 3: the equalities sum(x) = 0 and sum(x) = 1 contradict each other.
    A = torch.zeros(4, 2, 3, dtype=DTYPE)
    A[:, 0, 0] = 1.0
    A[:, 1, 1] = 1.0
    A[2, 1] = A[2, 0]
    A[3] = torch.cat([ones, ones])
    b = torch.zeros(4, 2, dtype=DTYPE)
    b[3, 1] = 1.0
    layer = QPLayer(maxiter=30)
    x = layer(Q, q, G, h, A, b)
    assert layer.last_solution.converged.tolist() == [True, False, False, False]
    assert torch.equal(x[1:], torch.zeros(3, 3, dtype=DTYPE))
    expected = torch.tensor([0.0, 0.0, -0.5], dtype=DTYPE)  # x0 = x1 = 0, |x2| <= 0.5
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)
    x.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[1:], torch.zeros(3, 3, dtype=DTYPE))
    with pytest.raises(RuntimeError, match=r"batch indices \[1, 2, 3\]"):
        QPLayer(maxiter=30, on_failure="raise")(Q, q, G, h, A, b)


def test_qp_layer_rejects_bad_options():
    with pytest.raises(TypeError, match="tol must be a number, got '1e-9'"):
        QPLayer(tol="1e-9")
    with pytest.raises(TypeError, match="maxiter must be an int, got 2.5"):
        QPLayer(maxiter=2.5)


def test_convex_layer_reports_non_finite_element():
    # SCS rejects NaN data for the whole batch with an allocation error, so the layer
    # must mark that element failed and solve the others.
    problem, parameters, variables = box_projection_problem()
    layer = ConvexLayer(problem, parameters, variables)
    target = torch.tensor([[0.2, 0.1], [float("nan"), 0.0], [0.3, -0.4]], dtype=DTYPE)
    lower = torch.zeros(3, 1, dtype=DTYPE)
    (x,) = layer(target, lower)
    assert layer.last_status.failed_indices == [1]
    assert layer.last_status.messages[1] == "parameter values are NaN or infinite"
    assert torch.equal(x[1], torch.zeros(2, dtype=DTYPE))
    torch.testing.assert_close(x[0], target[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(x[2], torch.tensor([0.35, -0.35], dtype=DTYPE), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"Parameter param\d+ contains NaN or infinite"):
        layer(target[0], torch.tensor([float("inf")], dtype=DTYPE))
