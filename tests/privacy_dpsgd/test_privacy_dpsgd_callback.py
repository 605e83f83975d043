"""DPSGD callback: privacy is really on, accounting matches Opacus, and the wiring holds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from zoo.datamodules.mnist import MNISTDataModule
from zoo.privacy.classifier import Classifier
from zoo.privacy.dpsgd import DPSGD
from zoo.privacy.loader import PoissonTrainLoader

DELTA = 1e-5
MLP = {"network": "mlp", "network_kwargs": {"in_features": 784, "hidden": [16]}}


@pytest.fixture(scope="module")
def mnist(shared_data: Path) -> MNISTDataModule:
    """1,000 MNIST training images in logical batches of 100, loaded once per module."""
    dm = MNISTDataModule(
        data_dir=str(shared_data), batch_size=100, subset=1000, val_size=1000, download=False
    )
    dm.setup("fit")
    return dm


def _trainer(callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _test_accuracy(model: pl.LightningModule, dm: MNISTDataModule) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (model(x).argmax(dim=1) == y).sum().item()
            total += len(y)
    return correct / total


class _Probe(Callback):
    """Record what Lightning really steps and feeds during training."""

    def __init__(self) -> None:
        self.optimizers: list[type] = []
        self.batch_sizes: list[int] = []
        self.loaders: list[object] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_sizes.append(len(batch[1]))
        self.loaders.append(trainer.train_dataloader)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizers.append(type(optimizer))


def test_dpsgd_steps_opacus_optimizer_and_poisson_loader(mnist: MNISTDataModule) -> None:
    pl.seed_everything(0)
    probe = _Probe()
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp")
    trainer = _trainer([dpsgd, probe], max_epochs=2)
    trainer.fit(Classifier(**MLP), mnist)

    assert len(probe.optimizers) == trainer.global_step == 20
    assert all(issubclass(cls, DPOptimizer) for cls in probe.optimizers)
    assert all(isinstance(loader, PoissonTrainLoader) for loader in probe.loaders)
    batch_sampler = probe.loaders[0].poisson_loader.batch_sampler
    assert isinstance(batch_sampler, UniformWithReplacementSampler)
    # Poisson sampling: batch sizes vary around the expected 100.
    assert len(set(probe.batch_sizes)) > 1
    assert 75 < sum(probe.batch_sizes) / len(probe.batch_sizes) < 125
    assert dpsgd.steps == 20
    # After fit the trainer and module are plain again.
    assert not isinstance(trainer.optimizers[0], DPOptimizer)


def test_dpsgd_epsilon_equals_opacus_accountant(mnist: MNISTDataModule) -> None:
    pl.seed_everything(0)
    dpsgd = DPSGD(noise_multiplier=0.8, accountant="rdp")
    trainer = _trainer([dpsgd], max_epochs=2)
    trainer.fit(Classifier(**MLP), mnist)

    sample_rate = 1 / len(mnist.train_dataloader())
    assert dpsgd.sample_rate == sample_rate
    reference = RDPAccountant()
    for _ in range(trainer.global_step):
        reference.step(noise_multiplier=0.8, sample_rate=sample_rate)
    expected = reference.get_epsilon(delta=DELTA)
    assert dpsgd.steps == trainer.global_step == 20
    assert dpsgd.epsilon() == pytest.approx(expected, rel=1e-12)
    logged = trainer.callback_metrics["privacy/epsilon"].item()
    assert logged == pytest.approx(expected, rel=1e-6)
    state = dpsgd.privacy_state()
    assert state["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert state["history"] == [[0.8, sample_rate, 20]]


def test_dpsgd_huge_noise_destroys_accuracy(mnist: MNISTDataModule) -> None:
    accuracies = {}
    for noise_multiplier in (0.5, 1e4):
        pl.seed_everything(0)
        model = Classifier(**MLP, lr=2.0)
        dpsgd = DPSGD(noise_multiplier=noise_multiplier, accountant="rdp")
        _trainer([dpsgd], max_epochs=2).fit(model, mnist)
        accuracies[noise_multiplier] = _test_accuracy(model, mnist)
    # Measured: 0.71 and 0.10 (chance) on these 1,000 test images.
    assert accuracies[0.5] > 0.6
    assert accuracies[1e4] < 0.25


def test_dpsgd_calibrates_noise_to_target(mnist: MNISTDataModule) -> None:
    pl.seed_everything(0)
    dpsgd = DPSGD(target_epsilon=2.0, accountant="rdp")
    trainer = _trainer([dpsgd], max_epochs=2)
    trainer.fit(Classifier(**MLP), mnist)
    assert dpsgd.steps == 20
    assert 2.0 - 0.02 <= dpsgd.epsilon() <= 2.0


def test_dpsgd_stops_when_budget_spent(mnist: MNISTDataModule) -> None:
    pl.seed_everything(0)
    dpsgd = DPSGD(target_epsilon=2.0, noise_multiplier=1.5, accountant="rdp")
    trainer = _trainer([dpsgd], max_epochs=20)
    trainer.fit(Classifier(**MLP), mnist)
    # 21 steps fit into the budget at sample rate 0.1, so training stops in epoch 3 of 20.
    assert dpsgd.steps == trainer.global_step == 21
    # Epochs 0 and 1 ran in full and epoch 2 for one step; fit leaves current_epoch at 3.
    assert trainer.current_epoch == 3
    assert dpsgd.epsilon() <= 2.0
    one_more = RDPAccountant()
    one_more.history = [(1.5, dpsgd.sample_rate, dpsgd.steps + 1)]
    assert one_more.get_epsilon(delta=DELTA) > 2.0


def test_dpsgd_spent_budget_takes_no_step(mnist: MNISTDataModule) -> None:
    pl.seed_everything(0)
    model = Classifier(**MLP)
    before = [p.detach().clone() for p in model.parameters()]
    dpsgd = DPSGD(target_epsilon=0.2, noise_multiplier=1.0, accountant="rdp")
    trainer = _trainer([dpsgd], max_epochs=2)
    trainer.fit(model, mnist)
    assert trainer.global_step == 0
    assert dpsgd.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_dpsgd_physical_batches_match_logical(mnist: MNISTDataModule) -> None:
    weights = {}
    for max_physical_batch_size in (None, 64):
        pl.seed_everything(0)
        probe = _Probe()
        model = Classifier(**MLP)
        dpsgd = DPSGD(
            noise_multiplier=1e-6,
            accountant="rdp",
            max_physical_batch_size=max_physical_batch_size,
            seed=7,
        )
        _trainer([dpsgd, probe], max_epochs=1).fit(model, mnist)
        assert dpsgd.steps == 10
        if max_physical_batch_size is not None:
            assert max(probe.batch_sizes) <= max_physical_batch_size
            assert len(probe.batch_sizes) > 10
        weights[max_physical_batch_size] = torch.cat([p.flatten() for p in model.parameters()])
    assert torch.allclose(weights[None], weights[64], atol=1e-5)


def test_dpsgd_replaces_batchnorm(mnist: MNISTDataModule, caplog: pytest.LogCaptureFixture) -> None:
    pl.seed_everything(0)
    model = Classifier(network="mnist_cnn", network_kwargs={"normalization": "batch"})
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp")
    with caplog.at_level(logging.INFO):
        _trainer([dpsgd], max_steps=2).fit(model, mnist)
    assert isinstance(model.net[1], torch.nn.GroupNorm)
    assert isinstance(model.net[5], torch.nn.GroupNorm)
    assert [name for name, _, _ in dpsgd.replaced_layers] == ["net.1", "net.5"]
    assert "replaced layer net.1 BatchNorm2d" in caplog.text


def test_dpsgd_rejects_batchnorm_without_fix(mnist: MNISTDataModule) -> None:
    model = Classifier(network="mnist_cnn", network_kwargs={"normalization": "batch"})
    dpsgd = DPSGD(noise_multiplier=1.0, fix_model=False)
    with pytest.raises(ValueError, match="BatchNorm.*fix_model=True"):
        _trainer([dpsgd], max_steps=1).fit(model, mnist)


def test_dpsgd_resume_continues_accountant(mnist: MNISTDataModule, tmp_path: Path) -> None:
    pl.seed_everything(0)
    first = DPSGD(noise_multiplier=1.0, accountant="rdp")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer([first, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        Classifier(**MLP), mnist
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["privacy"]["steps"] == 10
    assert saved["privacy"]["noise_multiplier"] == 1.0

    second = DPSGD(noise_multiplier=1.0, accountant="rdp")
    trainer = _trainer([second], max_epochs=2)
    trainer.fit(Classifier(**MLP), mnist, ckpt_path=tmp_path / "last.ckpt")
    assert second.steps == 20
    reference = RDPAccountant()
    reference.history = [(1.0, second.sample_rate, 20)]
    assert second.epsilon() == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-12)


def test_dpsgd_continues_pretrained_history(mnist: MNISTDataModule) -> None:
    pl.seed_everything(0)
    model = Classifier(**MLP)
    prior = [[1.2, 0.01, 300]]
    model.zoo_pretrained = {"name": "toy", "extra": {"privacy": {"history": prior}}}
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp")
    _trainer([dpsgd], max_epochs=1).fit(model, mnist)
    assert dpsgd.history == [(1.2, 0.01, 300), (1.0, dpsgd.sample_rate, 10)]
    assert dpsgd.privacy_state()["prior_source"] == "toy"
    reference = RDPAccountant()
    reference.history = [(1.2, 0.01, 300), (1.0, dpsgd.sample_rate, 10)]
    assert dpsgd.epsilon() == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-12)


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
    ],
)
def test_dpsgd_rejects_trainer_settings(
    mnist: MNISTDataModule, trainer_kwargs: dict, match: str
) -> None:
    dpsgd = DPSGD(noise_multiplier=1.0)
    with pytest.raises(ValueError, match=match):
        _trainer([dpsgd], max_steps=1, **trainer_kwargs).fit(Classifier(**MLP), mnist)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "target_epsilon or noise_multiplier"),
        ({"target_epsilon": -1.0}, ValueError, "target_epsilon must be a positive"),
        ({"noise_multiplier": 1.0, "target_delta": 1.5}, ValueError, "target_delta must be < 1"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        (
            {"noise_multiplier": 1.0, "grad_sample_mode": "ghosts"},
            ValueError,
            "'ghosts' is not supported",
        ),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, ValueError, "Unknown accountant"),
        ({"noise_multiplier": 1.0, "max_physical_batch_size": 0}, ValueError, ">= 1"),
        ({"noise_multiplier": "1"}, TypeError, "noise_multiplier must be a number"),
    ],
)
def test_dpsgd_rejects_invalid_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DPSGD(**kwargs)
