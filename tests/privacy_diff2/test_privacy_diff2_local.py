"""Tests of DIFF2-BVR-L-SGD: iterates against a hand-written loop, reduction to DIFF2-GD."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from zoo.privacy.diff2 import Diff2, FlatParameters, round_generator, simulate_diff2
from zoo.privacy.diff2_local import Diff2BVRLocalSGD, local_round_generator
from zoo.privacy.diff2_module import build_mlp, summed_logistic_loss

NUM_FEATURES = 8


def make_problem(num_records: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_records, NUM_FEATURES, generator=generator, dtype=torch.float64)
    weights = torch.randn(NUM_FEATURES, generator=generator, dtype=torch.float64)
    targets = inputs @ weights + 0.5 * torch.randn(num_records, generator=generator) > 0
    return inputs, targets.to(torch.float64)


def make_net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_mlp(NUM_FEATURES, [5], "softplus").double()


def two_shards(
    inputs: torch.Tensor, targets: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(inputs[::2], targets[::2]), (inputs[1::2], targets[1::2])]


class HandWrittenDiff2:
    """DIFF2-BVR-L-SGD for one worker, written out with one autograd call per example."""

    def __init__(self, net: torch.nn.Module, settings: dict) -> None:
        self.net = net
        self.flat = FlatParameters(net)
        self.settings = settings

    def example_gradient(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        def loss(flat_params: torch.Tensor) -> torch.Tensor:
            outputs = functional_call(self.net, self.flat.unflatten(flat_params), (x[None],))
            return summed_logistic_loss(outputs, y[None])

        return grad(loss)(params)

    def clipped(self, vector: torch.Tensor, radius: float) -> torch.Tensor:
        # Opacus' flat clipping: scale by min(1, C / (norm + 1e-6)).
        return vector * min(1.0, radius / (float(vector.norm()) + 1e-6))

    def noise(self, std: float, generator: torch.Generator) -> torch.Tensor:
        pieces = [
            torch.normal(0.0, std, size=tuple(shape), generator=generator, dtype=torch.float64)
            for shape in self.flat.shapes
        ]
        return torch.cat([piece.reshape(-1) for piece in pieces])

    def run(self, inputs, targets, rounds: int, noise_seed: int) -> torch.Tensor:
        s = self.settings
        n = len(inputs)
        x = self.flat.flatten(self.net)
        x_before = v = None
        for r in range(rounds):
            generator = round_generator(noise_seed, 0, r)
            if r % s["restart_interval"] == 0:
                total = sum(
                    self.clipped(self.example_gradient(x, inputs[i], targets[i]), s["clip"])
                    for i in range(n)
                )
                v = (total + self.noise(s["sigma1"] * s["clip"], generator)) / n
            else:
                radius = s["smoothness"] * float((x - x_before).norm())
                total = sum(
                    self.clipped(
                        self.example_gradient(x, inputs[i], targets[i])
                        - self.example_gradient(x_before, inputs[i], targets[i]),
                        radius,
                    )
                    for i in range(n)
                )
                v = v + (total + self.noise(s["sigma2"] * radius, generator)) / n
            x_before = x

            local_generator = local_round_generator(noise_seed, 0, r)
            local_v = v.clone()
            local_before, local_x = x, x - s["lr"] * local_v
            for _ in range(s["local_steps"] - 1):
                sample = torch.rand(n, generator=local_generator, dtype=torch.float64) < s["q"]
                if s["clip_local"] is not None:
                    radius = s["clip_local"]
                else:
                    radius = s["smoothness"] * float((local_x - local_before).norm())
                total = torch.zeros_like(x)
                for i in sample.nonzero().squeeze(1).tolist():
                    difference = self.example_gradient(
                        local_x, inputs[i], targets[i]
                    ) - self.example_gradient(local_before, inputs[i], targets[i])
                    total = total + self.clipped(difference, radius)
                noise = self.noise(s["sigma3"] * radius, local_generator)
                local_v = local_v + (total + noise) / (s["q"] * n)
                local_before, local_x = local_x, local_x - s["lr"] * local_v
            x = local_x
        return x


@pytest.mark.parametrize("clip_local", [0.05, None])
def test_iterates_match_hand_written_loop(clip_local: float | None) -> None:
    inputs, targets = make_problem(num_records=60)
    settings = {
        "lr": 0.8,
        "restart_interval": 2,
        "clip": 0.7,
        "smoothness": 0.6,
        "sigma1": 0.9,
        "sigma2": 1.3,
        "sigma3": 1.1,
        "local_steps": 4,
        "q": 0.25,
        "clip_local": clip_local,
    }
    algorithm = Diff2BVRLocalSGD(
        make_net(),
        summed_logistic_loss,
        local_steps=settings["local_steps"],
        local_sample_rate=settings["q"],
        noise_multiplier_local=settings["sigma3"],
        clip_local=clip_local,
        local_smoothness=settings["smoothness"] if clip_local is None else None,
        lr=settings["lr"],
        restart_interval=settings["restart_interval"],
        clip_restart=settings["clip"],
        noise_multiplier_restart=settings["sigma1"],
        noise_multiplier_difference=settings["sigma2"],
        smoothness=settings["smoothness"],
    )
    start = algorithm.flat.flatten(algorithm.model)
    simulate_diff2(algorithm, [(inputs, targets)], rounds=3, noise_seed=21)
    ours = algorithm.flat.flatten(algorithm.model)
    by_hand = HandWrittenDiff2(make_net(), settings).run(inputs, targets, 3, noise_seed=21)
    assert not torch.allclose(ours, start), "the iterate must move"
    torch.testing.assert_close(ours, by_hand, rtol=1e-9, atol=1e-12)


def test_one_local_step_equals_diff2_gd() -> None:
    inputs, targets = make_problem(num_records=200)
    settings = {
        "lr": 1.0,
        "restart_interval": 3,
        "clip_restart": 1.0,
        "noise_multiplier_restart": 2.0,
        "noise_multiplier_difference": 3.0,
        "smoothness": 0.5,
    }
    gd = Diff2(make_net(), summed_logistic_loss, **settings)
    local = Diff2BVRLocalSGD(
        make_net(),
        summed_logistic_loss,
        local_steps=1,
        local_sample_rate=0.1,
        noise_multiplier_local=0.0,
        **settings,
    )
    shards = two_shards(inputs, targets)
    gd_result = simulate_diff2(gd, shards, rounds=7, noise_seed=4)
    local_result = simulate_diff2(local, shards, rounds=7, noise_seed=4)
    # The record-weighted mean of identical iterates may differ from them in the last bit.
    torch.testing.assert_close(local_result.params, gd_result.params, rtol=1e-12, atol=1e-14)
    assert local_result.clip == pytest.approx(gd_result.clip, rel=1e-9)


def test_local_clip_ignores_private_data() -> None:
    # The same iterates with different records must give the same local clip radii.
    inputs, targets = make_problem(num_records=100, seed=0)
    other_inputs, other_targets = make_problem(num_records=100, seed=1)
    algorithm = Diff2BVRLocalSGD(
        make_net(),
        summed_logistic_loss,
        local_steps=3,
        local_sample_rate=0.3,
        noise_multiplier_local=1.0,
        local_smoothness=2.0,
        lr=0.5,
        restart_interval=1,
        clip_restart=1.0,
        noise_multiplier_restart=1.0,
    )
    simulate_diff2(algorithm, [(inputs, targets)], 1, noise_seed=0)
    message = algorithm.worker_message(inputs, targets, round_generator(0, 0, 1))
    algorithm.server_update(message.vector, len(inputs), message.restart)
    first = algorithm.local_iterate(inputs, targets, local_round_generator(0, 0, 1))
    second = algorithm.local_iterate(other_inputs, other_targets, local_round_generator(0, 0, 1))
    # The first radius comes from x_1 - x_0 = -lr * v_r, which is already released.
    assert first.clips[0] == second.clips[0]
    assert first.clips[0] == pytest.approx(2.0 * 0.5 * float(algorithm.estimate.norm()))
    assert not torch.equal(first.params, second.params)


def test_huge_local_noise_destroys_accuracy() -> None:
    # Only the local updates are noisy here, so accuracy can only fall through them.
    inputs, targets = make_problem(num_records=400)
    accuracies = {}
    for sigma in (0.0, 1e4):
        net = make_net()
        algorithm = Diff2BVRLocalSGD(
            net,
            summed_logistic_loss,
            local_steps=4,
            local_sample_rate=0.2,
            noise_multiplier_local=sigma,
            clip_local=0.5,
            lr=1.0,
            restart_interval=1,
            clip_restart=1.0,
            noise_multiplier_restart=0.0,
        )
        simulate_diff2(algorithm, two_shards(inputs, targets), 15, noise_seed=0)
        with torch.no_grad():
            predictions = (net(inputs).squeeze(-1) > 0).to(torch.float64)
        accuracies[sigma] = (predictions == targets).double().mean().item()
    assert accuracies[0.0] > 0.85
    assert accuracies[1e4] < 0.75


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"local_steps": 0}, "local_steps"),
        ({"local_sample_rate": 0.0}, "local_sample_rate"),
        ({"local_sample_rate": 1.5}, "local_sample_rate"),
        ({"noise_multiplier_local": -1.0}, "noise_multiplier_local"),
        ({"clip_local": None}, "exactly one"),
        ({"local_smoothness": 1.0}, "exactly one"),
        ({"clip_local": float("nan")}, "clip_local"),
        ({"clip_local": 0.0}, "clip_local must be a finite number > 0"),
        ({"clip_local": None, "local_smoothness": 0.0}, "local_smoothness must be"),
    ],
)
def test_invalid_local_settings_raise(overrides: dict, match: str) -> None:
    settings = {
        "local_steps": 3,
        "local_sample_rate": 0.1,
        "noise_multiplier_local": 1.0,
        "clip_local": 0.1,
        "lr": 0.1,
        "restart_interval": 1,
        "clip_restart": 1.0,
        "noise_multiplier_restart": 1.0,
    }
    settings.update(overrides)
    with pytest.raises(ValueError, match=match):
        Diff2BVRLocalSGD(make_net(), summed_logistic_loss, **settings)


def test_local_iterate_needs_estimate() -> None:
    inputs, targets = make_problem(num_records=10)
    algorithm = Diff2BVRLocalSGD(
        make_net(),
        summed_logistic_loss,
        local_steps=2,
        local_sample_rate=0.5,
        noise_multiplier_local=1.0,
        clip_local=0.1,
        lr=0.1,
        restart_interval=1,
        clip_restart=1.0,
        noise_multiplier_restart=1.0,
    )
    with pytest.raises(RuntimeError, match="server_update"):
        algorithm.local_iterate(inputs, targets, local_round_generator(0, 0, 0))


@pytest.mark.parametrize(("local_steps", "raises"), [(2, True), (1, False)])
def test_local_sample_below_one_record(local_steps: int, raises: bool) -> None:
    # q * n_p = 0.05 * 10 = 0.5 expected records per local update.
    inputs, targets = make_problem(num_records=10)
    algorithm = Diff2BVRLocalSGD(
        make_net(),
        summed_logistic_loss,
        local_steps=local_steps,
        local_sample_rate=0.05,
        noise_multiplier_local=1.0,
        clip_local=0.1,
        lr=0.1,
        restart_interval=1,
        clip_restart=1.0,
        noise_multiplier_restart=1.0,
    )
    algorithm.server_update(
        torch.ones(algorithm.flat.dim, dtype=torch.float64), num_records=10, restart=True
    )
    generator = local_round_generator(0, 0, 0)
    if raises:
        with pytest.raises(ValueError, match=r"local_sample_rate=0.05 expects 0.5 records"):
            algorithm.local_iterate(inputs, targets, generator)
        algorithm.check_local_sample_size(20)
    else:
        run = algorithm.local_iterate(inputs, targets, generator)
        assert run.clips == []
