"""DPSGD callback in every Opacus mode: one private step equals the clipped, noised mean."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import quiet_trainer
from zoo.privacy.dpsgd import DPSGD
from zoo.privacy.modes import batch_size_of, layers_without_expanded_weights

MAX_GRAD_NORM = 0.05
LR = 1.0


class _SmallNet(pl.LightningModule):
    """Convolution, GroupNorm and linear layers; the step returns per-example losses too."""

    def __init__(self, regularize: float = 0.0, per_example: bool = True) -> None:
        super().__init__()
        self.regularize = regularize
        self.per_example = per_example
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 3),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        loss = losses.mean()
        if self.regularize:
            loss = loss + self.regularize * self.net[4].weight.pow(2).sum()
        if not self.per_example:
            return loss
        return {"loss": loss, "per_example_loss": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class _BatchProbe(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[Tensor, Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(64, 1, 8, 8, generator=generator),
        torch.randint(0, 3, (64,), generator=generator),
    )


def _trainer(callbacks: list[Callback], **options: Any) -> pl.Trainer:
    """Return a quiet CPU Trainer that takes one step unless ``options`` say otherwise."""
    return quiet_trainer(callbacks, **{"max_steps": 1, **options})


def _fit(model: pl.LightningModule, dpsgd: DPSGD, callbacks: list[Callback] = ()) -> pl.Trainer:
    trainer = _trainer([dpsgd, *callbacks])
    trainer.fit(model, train_dataloaders=DataLoader(_data(), batch_size=16))
    return trainer


def _clipped_sum(model: _SmallNet, x: Tensor, y: Tensor) -> list[Tensor]:
    """Sum over examples of each example's gradient clipped to MAX_GRAD_NORM, one at a time."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        F.cross_entropy(model.net(xi[None]), yi[None]).backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = min(1.0, MAX_GRAD_NORM / (norm.item() + 1e-6))
        for acc, grad in zip(total, grads, strict=True):
            acc += factor * grad
    return total


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_private_step_clipped_mean_and_noise(mode: str) -> None:
    updates = {}
    for noise_multiplier in (1e-9, 2.0):
        torch.manual_seed(0)
        model = _SmallNet()
        start = copy.deepcopy(model)
        probe = _BatchProbe()
        dpsgd = DPSGD(
            noise_multiplier=noise_multiplier,
            max_grad_norm=MAX_GRAD_NORM,
            grad_sample_mode=mode,
            accountant="rdp",
            seed=3,
        )
        _fit(model, dpsgd, [probe])
        assert dpsgd.active_mode == mode
        assert dpsgd.steps == 1
        assert len(probe.batches) == 1
        x, y = probe.batches[0]
        expected = [-LR * g / dpsgd.expected_batch_size for g in _clipped_sum(start, x, y)]
        actual = [
            a.detach() - b.detach()
            for a, b in zip(model.parameters(), start.parameters(), strict=True)
        ]
        updates[noise_multiplier] = (actual, expected)

    # Without noise: exactly the mean of the clipped per-example gradients.
    actual, expected = updates[1e-9]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)
    # With noise: the deviation is Gaussian with std sigma * C / B on every coordinate.
    actual, expected = updates[2.0]
    noise = torch.cat([(a - e).flatten() for a, e in zip(actual, expected, strict=True)])
    std = LR * 2.0 * MAX_GRAD_NORM / dpsgd.expected_batch_size
    assert noise.numel() > 400
    assert noise.std().item() == pytest.approx(std, rel=0.1)
    assert abs(noise.mean().item()) < 4 * std / noise.numel() ** 0.5


def test_auto_mode_follows_layer_support() -> None:
    torch.manual_seed(0)
    plain = DPSGD(noise_multiplier=1.0, accountant="rdp")
    _fit(_SmallNet(), plain)
    assert plain.active_mode == "ew"
    assert plain.privacy_state()["grad_sample_mode"] == "ew"

    model = _SmallNet()
    model.net[2] = nn.PReLU()
    assert layers_without_expanded_weights(model) == ["net.2"]
    fallback = DPSGD(noise_multiplier=1.0, accountant="rdp")
    _fit(model, fallback)
    assert fallback.active_mode == "hooks"


def test_ew_rejects_unsupported_layer() -> None:
    model = _SmallNet()
    model.net[2] = nn.PReLU()
    with pytest.raises(ValueError, match=r"'ew' cannot train layers net\.2.*'hooks'"):
        _fit(model, DPSGD(noise_multiplier=1.0, grad_sample_mode="ew"))


def test_ew_explains_unsupported_operation() -> None:
    with pytest.raises(ValueError, match=r"grad_sample_mode 'ew'.*cannot handle function pow"):
        _fit(_SmallNet(regularize=0.1), DPSGD(noise_multiplier=1.0, grad_sample_mode="ew"))


def test_ghost_needs_per_example_losses() -> None:
    with pytest.raises(ValueError, match=r"'ghost' needs _SmallNet\.training_step to return"):
        _fit(_SmallNet(per_example=False), DPSGD(noise_multiplier=1.0, grad_sample_mode="ghost"))


def test_ghost_rejects_extra_loss_terms() -> None:
    with pytest.raises(ValueError, match=r"mean of 'per_example_loss' is .* would be dropped"):
        _fit(
            _SmallNet(regularize=0.1),
            DPSGD(noise_multiplier=1.0, grad_sample_mode="ghost", accountant="rdp"),
        )


def test_modes_leave_module_plain_after_fit() -> None:
    for mode in ("ew", "ghost"):
        model = _SmallNet()
        _fit(model, DPSGD(noise_multiplier=1.0, grad_sample_mode=mode, accountant="rdp"))
        assert "training_step" not in vars(model)
        assert "backward" not in vars(model)


@pytest.mark.parametrize(
    ("batch", "size"),
    [(torch.zeros(5, 2), 5), ((torch.tensor(1.0), torch.zeros(3)), 3), ({"x": [torch.ones(4)]}, 4)],
)
def test_batch_size_of_nested_batches(batch: Any, size: int) -> None:
    assert batch_size_of(batch) == size


def test_batch_size_of_rejects_batch_without_tensor() -> None:
    with pytest.raises(LookupError, match="no batched tensor"):
        batch_size_of(["a", 1])


class _BatchCentered(_SmallNet):
    """Subtracts the batch mean of the features in training mode, so each loss depends on all."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        features = self.net[:4](x)
        if self.training:
            features = features - features.mean(0)
        losses = F.cross_entropy(self.net[4](features), y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}


class _BatchStatistics(_SmallNet):
    """Normalizes the features with batch statistics in training mode, as BatchNorm does."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        features = F.batch_norm(self.net[:4](x), None, None, training=self.training)
        losses = F.cross_entropy(self.net[4](features), y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}


class _Penalized(_SmallNet):
    """Adds a weight penalty to every example's loss."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        penalty = 0.5 * self.net[4].weight.pow(2).sum()
        losses = F.cross_entropy(self.net(x), y, reduction="none") + penalty
        return {"loss": losses.mean(), "per_example_loss": losses}


class _TiedOutput(_SmallNet):
    """Reuses the last layer's weight in a second, functional projection."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        features = self.net[:4](x)
        logits = self.net[4](features) + F.linear(features, self.net[4].weight)
        losses = F.cross_entropy(logits, y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}


class _CalledTwice(_SmallNet):
    """Calls the last layer twice in one step."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        features = self.net[:4](x)
        logits = self.net[4](features) + self.net[4](0.5 * features)
        losses = F.cross_entropy(logits, y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}


class _ModuleScale(_SmallNet):
    """Has a parameter of its own, outside every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        losses = F.cross_entropy(self.scale * self.net(x), y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}


class _WithDropout(_SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.net.insert(4, nn.Dropout(0.5))


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
@pytest.mark.parametrize(
    ("model_class", "match"),
    [
        (_BatchCentered, r"_BatchCentered does not treat the examples of a batch independently"),
        (_BatchStatistics, r"_BatchStatistics.training_step failed on a batch of one example"),
    ],
)
def test_mixing_model_rejected(mode: str, model_class: type, match: str) -> None:
    model = model_class()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        _fit(model, DPSGD(noise_multiplier=1.0, grad_sample_mode=mode, accountant="rdp"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("model_class", "mode", "match"),
    [
        (_Penalized, "hooks", r"net\.4\.weight \(\d"),
        (_Penalized, "ghost", r"\(gradient norm\)"),
        (_TiedOutput, "hooks", r"net\.4\.weight \(\d"),
        (_TiedOutput, "ghost", r"\(gradient norm\)"),
        (_CalledTwice, "ghost", r"tied or reused weights"),
        (_ModuleScale, "hooks", r"parameters scale belong to _ModuleScale itself"),
    ],
)
def test_unclipped_parameter_use_rejected(model_class: type, mode: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _fit(model_class(), DPSGD(noise_multiplier=1.0, grad_sample_mode=mode, accountant="rdp"))


def test_tied_weight_trains_with_expanded_weights() -> None:
    dpsgd = DPSGD(noise_multiplier=1.0, grad_sample_mode="ew", accountant="rdp")
    _fit(_TiedOutput(), dpsgd)
    assert dpsgd.steps == 1


@pytest.mark.parametrize("mode", ["auto", "hooks", "ghost"])
def test_dropout_model_passes_audit(mode: str) -> None:
    dpsgd = DPSGD(noise_multiplier=1.0, grad_sample_mode=mode, accountant="rdp")
    _fit(_WithDropout(), dpsgd)
    assert dpsgd.steps == 1


def test_independence_check_can_be_switched_off() -> None:
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp", check_independence=False)
    _fit(_BatchCentered(), dpsgd)
    assert dpsgd.steps == 1


def test_ode_classifier_rejected_as_coupled() -> None:
    # Every layer of the ODE classifier supports expanded weights, so "auto" picks them, but
    # its gradient on two images differs from the mean of the single-image gradients (by
    # 2.4% for this config), which the independence check reports before any step.
    from zoo.datamodules.digits import DigitsDataModule
    from zoo.hub import create_model

    model = create_model("ode-digits-ernode")
    trainer = _trainer(
        [DPSGD(noise_multiplier=1.0, accountant="rdp")],
        max_steps=1,
        max_epochs=1,
        limit_val_batches=0,
    )
    with pytest.raises(ValueError, match=r"ODEClassifier does not treat the examples"):
        trainer.fit(model, DigitsDataModule(batch_size=16))


def test_noise_ignores_global_seed() -> None:
    weights = []
    for seed in (None, None, 5, 5):
        pl.seed_everything(0)
        model = _SmallNet()
        _fit(model, DPSGD(noise_multiplier=1.0, accountant="rdp", seed=seed))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # Unset, the seed comes from the operating system, so equal configs give fresh noise.
    assert not torch.allclose(weights[0], weights[1])
    # An explicit seed repeats batches and noise exactly.
    assert torch.equal(weights[2], weights[3])


@pytest.mark.parametrize("mode", ["ew", "hooks", "functorch", "ghost"])
def test_empty_batches_take_noisy_steps(mode: str) -> None:
    # An expected batch of one example out of 64 leaves about a third of the batches empty.
    class _Sizes(Callback):
        sizes: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.sizes.append(len(batch[1]))

    probe = _Sizes()
    probe.sizes = []
    model = _SmallNet()
    dpsgd = DPSGD(noise_multiplier=1.0, grad_sample_mode=mode, accountant="rdp", seed=1)
    trainer = _trainer([dpsgd, probe], max_steps=20)
    trainer.fit(model, train_dataloaders=DataLoader(_data(), batch_size=1))
    assert 0 in probe.sizes
    assert dpsgd.steps == trainer.global_step == 20


def test_batch_limit_with_physical_batches() -> None:
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp", max_physical_batch_size=4)
    trainer = _trainer([dpsgd], max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match=r"limit_train_batches=1 with max_physical_batch_size=4"):
        trainer.fit(_SmallNet(), train_dataloaders=DataLoader(_data(), batch_size=16))


def test_unreachable_budget_names_the_target() -> None:
    with pytest.raises(
        ValueError, match=r"target_epsilon=1e-06 at delta=1e-05.*Raise target_epsilon"
    ):
        _fit(_SmallNet(), DPSGD(target_epsilon=1e-6, accountant="rdp", epochs=1))


class _ZeroHeadPenalized(_Penalized):
    """Starts with a zero head, so its penalty has no gradient at the audited first step."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.net[4].weight)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        penalty = 200.0 * self.net[4].weight.pow(2).sum()
        losses = F.cross_entropy(self.net(x), y, reduction="none") + penalty
        return {"loss": losses.mean(), "per_example_loss": losses}


def test_ghost_checks_clipping_bound_on_every_step() -> None:
    dpsgd = DPSGD(noise_multiplier=1e-9, grad_sample_mode="ghost", accountant="rdp")
    trainer = _trainer([dpsgd], max_steps=4)
    with pytest.raises(RuntimeError, match=r"clipped gradient sum has norm .* more than"):
        trainer.fit(_ZeroHeadPenalized(), train_dataloaders=DataLoader(_data(), batch_size=16))
    assert 1 <= dpsgd.steps < 4


def test_ghost_rejects_parameter_of_module_itself() -> None:
    with pytest.raises(ValueError, match=r"parameters scale belong to _ModuleScale itself"):
        _fit(_ModuleScale(), DPSGD(noise_multiplier=1.0, grad_sample_mode="ghost"))


class _SummedLoss(_SmallNet):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="sum")


def test_summed_loss_is_rejected_with_reason() -> None:
    with pytest.raises(ValueError, match=r"is the sum over the batch, not the mean"):
        _fit(_SummedLoss(per_example=False), DPSGD(noise_multiplier=1.0, accountant="rdp"))


def test_slice_batch_keeps_per_example_names() -> None:
    from zoo.privacy.independence import slice_batch

    batch = {"x": torch.zeros(3, 2), "names": ["a", "b", "c"], "pair": (torch.ones(3), 7)}
    sliced = slice_batch(batch, slice(0, 1), 3)
    assert sliced["names"] == ["a"]
    assert sliced["x"].shape == (1, 2)
    assert sliced["pair"][0].shape == (1,)
    assert sliced["pair"][1] == 7
