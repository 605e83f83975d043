"""Tests of the DIFF2-GD algorithm: reduction to DP-GD, clipping, and per-example gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from zoo.privacy.diff2 import (
    Diff2,
    LinearStackGradients,
    PerExampleGradients,
    round_generator,
    simulate_diff2,
)
from zoo.privacy.diff2_module import build_mlp, summed_logistic_loss

NUM_FEATURES = 12


def make_problem(num_records: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_records, NUM_FEATURES, generator=generator, dtype=torch.float64)
    weights = torch.randn(NUM_FEATURES, generator=generator, dtype=torch.float64)
    targets = inputs @ weights + 0.5 * torch.randn(num_records, generator=generator) > 0
    return inputs, targets.to(torch.float64)


def make_net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_mlp(NUM_FEATURES, [6], "softplus").double()


def test_restart_every_round_equals_opacus_dp_gd() -> None:
    inputs, targets = make_problem()
    sigma, clip, lr, rounds = 0.8, 0.5, 0.7, 6
    net_diff2, net_opacus = make_net(), make_net()

    algorithm = Diff2(
        net_diff2,
        summed_logistic_loss,
        lr=lr,
        restart_interval=1,
        clip_restart=clip,
        noise_multiplier_restart=sigma,
    )
    generator_diff2 = torch.Generator().manual_seed(7)
    for _ in range(rounds):
        message = algorithm.worker_message(inputs, targets, generator_diff2)
        assert message.restart
        algorithm.server_update(message.vector, len(inputs), message.restart)

    # DP-GD as Opacus runs it: full batch, flat clipping, noise std sigma * clip, mean.
    module = GradSampleModule(net_opacus)
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=lr),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=len(inputs),
        generator=torch.Generator().manual_seed(7),
    )
    for _ in range(rounds):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            module(inputs).squeeze(-1), targets
        )
        loss.backward()
        optimizer.step()

    for (name, ours), theirs in zip(
        net_diff2.named_parameters(), net_opacus.parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11, msg=name)


def test_restart_rounds_follow_interval() -> None:
    inputs, targets = make_problem()
    algorithm = Diff2(
        make_net(),
        summed_logistic_loss,
        lr=0.5,
        restart_interval=3,
        clip_restart=1.0,
        noise_multiplier_restart=0.0,
        noise_multiplier_difference=0.0,
        clip_difference=1e6,
    )
    result = simulate_diff2(algorithm, [(inputs, targets)], rounds=7, noise_seed=0)
    assert result.restart == [True, False, False, True, False, False, True]


def test_noiseless_unclipped_diff2_is_gradient_descent() -> None:
    # Without noise and with radii that never clip, the difference rounds telescope, so
    # v_r is the exact mean gradient at x_r and DIFF2-GD is plain gradient descent.
    inputs, targets = make_problem()
    net_diff2, net_gd = make_net(), make_net()
    algorithm = Diff2(
        net_diff2,
        summed_logistic_loss,
        lr=0.5,
        restart_interval=4,
        clip_restart=1e6,
        noise_multiplier_restart=0.0,
        noise_multiplier_difference=0.0,
        clip_difference=1e6,
    )
    simulate_diff2(algorithm, [(inputs, targets)], rounds=9, noise_seed=0)
    optimizer = torch.optim.SGD(net_gd.parameters(), lr=0.5)
    for _ in range(9):
        optimizer.zero_grad()
        loss = summed_logistic_loss(net_gd(inputs), targets) / len(inputs)
        loss.backward()
        optimizer.step()
    for ours, theirs in zip(net_diff2.parameters(), net_gd.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)


def test_smoothness_clip_uses_step_length() -> None:
    inputs, targets = make_problem()
    algorithm = Diff2(
        make_net(),
        summed_logistic_loss,
        lr=0.3,
        restart_interval=5,
        clip_restart=1.0,
        noise_multiplier_restart=1.0,
        noise_multiplier_difference=1.0,
        smoothness=2.5,
    )
    records: list[tuple[float, float]] = []

    def record_step(round_index: int, state: Diff2) -> None:
        step = state.flat.flatten(state.model) - state.previous_params
        records.append((float(step.norm()), state.round_index))

    result = simulate_diff2(algorithm, [(inputs, targets)], 4, noise_seed=1, callback=record_step)
    # Round r > 0 clips at L * ||x_r - x_(r-1)||: a function of earlier released iterates only.
    for r in range(1, 4):
        assert result.clip[r] == pytest.approx(2.5 * records[r - 1][0], rel=1e-12)
    assert result.clip[0] == 1.0


def test_clip_radius_ignores_private_data() -> None:
    # The same iterates with different records must give the same difference clip.
    inputs, targets = make_problem(seed=0)
    other_inputs, other_targets = make_problem(seed=1)
    net = make_net()
    algorithm = Diff2(
        net,
        summed_logistic_loss,
        lr=0.3,
        restart_interval=5,
        clip_restart=1.0,
        noise_multiplier_restart=1.0,
        noise_multiplier_difference=1.0,
        smoothness=2.5,
    )
    simulate_diff2(algorithm, [(inputs, targets)], 2, noise_seed=0)
    twin = copy.deepcopy(algorithm)
    first = algorithm.worker_message(inputs, targets, round_generator(0, 0, 2))
    second = twin.worker_message(other_inputs, other_targets, round_generator(0, 0, 2))
    assert first.clip == second.clip
    assert not torch.equal(first.vector, second.vector)


def test_linear_stack_matches_materialised_gradients() -> None:
    inputs, targets = make_problem(num_records=257)
    torch.manual_seed(3)
    net = build_mlp(NUM_FEATURES, [7, 5], "tanh").double()
    materialised = PerExampleGradients(net, summed_logistic_loss, chunk_size=100)
    factored = LinearStackGradients(net, summed_logistic_loss, chunk_size=64)
    params = materialised.flat.flatten(net)
    previous = params + 0.1 * torch.randn_like(params)
    for clip in (0.01, 0.3, 1e6):
        torch.testing.assert_close(
            factored.clipped_sum(params, inputs, targets, clip),
            materialised.clipped_sum(params, inputs, targets, clip),
        )
        torch.testing.assert_close(
            factored.clipped_difference_sum(params, previous, inputs, targets, clip),
            materialised.clipped_difference_sum(params, previous, inputs, targets, clip),
        )


def test_clipped_sum_bounds_each_example() -> None:
    # One record changes a clipped sum by at most the clip radius: the sensitivity bound.
    inputs, targets = make_problem(num_records=50)
    net = make_net()
    gradients = LinearStackGradients(net, summed_logistic_loss)
    params = gradients.flat.flatten(net)
    previous = params + 0.2 * torch.randn_like(params)
    full = gradients.clipped_difference_sum(params, previous, inputs, targets, 0.05)
    without_first = gradients.clipped_difference_sum(
        params, previous, inputs[1:], targets[1:], 0.05
    )
    assert (full - without_first).norm().item() <= 0.05 + 1e-9


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"restart_interval": 0}, "restart_interval"),
        ({"lr": -1.0}, "lr"),
        ({"clip_restart": 0.0}, "clip_restart"),
        ({"noise_multiplier_restart": -0.5}, "noise_multiplier_restart"),
        ({"smoothness": None}, "exactly one"),
        ({"clip_difference": 1.0}, "exactly one"),
        ({"smoothness": 0.0}, "smoothness must be a finite number > 0"),
        ({"smoothness": None, "clip_difference": 0.0}, "clip_difference must be"),
        ({"smoothness": float("inf")}, "smoothness"),
    ],
)
def test_invalid_settings_raise(overrides: dict, match: str) -> None:
    settings = {
        "lr": 0.1,
        "restart_interval": 4,
        "clip_restart": 1.0,
        "noise_multiplier_restart": 1.0,
        "noise_multiplier_difference": 1.0,
        "smoothness": 1.0,
    }
    settings.update(overrides)
    with pytest.raises(ValueError, match=match):
        Diff2(make_net(), summed_logistic_loss, **settings)


@pytest.mark.parametrize("interval", [1, 4])
def test_huge_noise_destroys_accuracy(interval: int) -> None:
    # If the noise were not applied, a huge multiplier would leave training unchanged.
    inputs, targets = make_problem(num_records=400)
    accuracies = {}
    for sigma in (0.0, 1e4):
        net = make_net()
        algorithm = Diff2(
            net,
            summed_logistic_loss,
            lr=1.0,
            restart_interval=interval,
            clip_restart=1.0,
            noise_multiplier_restart=sigma,
            noise_multiplier_difference=sigma,
            clip_difference=0.5,
        )
        simulate_diff2(
            algorithm, [(inputs[::2], targets[::2]), (inputs[1::2], targets[1::2])], 20, 0
        )
        with torch.no_grad():
            predictions = (net(inputs).squeeze(-1) > 0).to(torch.float64)
        accuracies[sigma] = (predictions == targets).double().mean().item()
    assert accuracies[0.0] > 0.85
    assert accuracies[1e4] < 0.75
