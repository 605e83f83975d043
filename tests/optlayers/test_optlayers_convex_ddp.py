"""An infeasible batch element on one DDP process neither crashes nor stalls the other."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, port: int, results: dict) -> None:
    import cvxpy as cp

    from zoo.optlayers.cvxpy_layer import ConvexLayer

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x = cp.Variable(2)
    target = cp.Parameter(2)
    lower = cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - target)), [cp.sum(x) >= lower, x <= 1])
    layer = ConvexLayer(problem, [target, lower], [x])
    weights = torch.ones(2, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0.2, 0.3], [0.5, 0.1]], dtype=torch.float64) * weights
    # Rank 1's second element needs x1 + x2 >= 5 with x <= 1: infeasible.
    lowers = torch.tensor([[0.0], [5.0 if rank == 1 else 0.0]], dtype=torch.float64)
    (solution,) = layer(targets, lowers)
    ok = layer.last_status.ok.to(torch.float64)
    loss = ((solution**2).sum(-1) * ok).sum()
    loss.backward()
    dist.all_reduce(weights.grad)
    results[rank] = (layer.last_status.failed_indices, weights.grad.tolist())
    dist.destroy_process_group()


def test_convex_layer_failure_under_ddp():
    port = _free_loopback_port()
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.start_processes(
            _worker, args=(port, results), nprocs=2, join=False, start_method="spawn"
        )
        for process in context.processes:
            process.join(timeout=120)
        alive = [process.pid for process in context.processes if process.is_alive()]
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        assert not alive, f"DDP workers {alive} still running after 120 s"
        assert [process.exitcode for process in context.processes] == [0, 0]
        assert results[0][0] == []
        assert results[1][0] == [1]
        assert results[0][1] == results[1][1]
