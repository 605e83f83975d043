"""Bilevel regularization tuning: hypergradients, training, DDP and the shipped checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_zoo
from zoo.datamodules.breast_cancer import BreastCancerBilevelDataModule
from zoo.optlayers.bilevel import BilevelLogisticRegression, evaluate_split
from zoo.optlayers.logistic import add_intercept, fit_gradient_descent, fit_newton, solve_implicit


@pytest.fixture(autouse=True)
def single_thread():
    """Run with one intra-op thread: the solvers' many tiny batched operations get slower,
    not faster, from thread synchronization on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def splits():
    datamodule = BreastCancerBilevelDataModule()
    datamodule.setup()
    return datamodule.splits


def validation_loss(log_reg, splits, mode="implicit"):
    design = add_intercept(splits["inner"][0])
    if mode == "implicit":
        weights = solve_implicit(log_reg, design, splits["inner"][1], tol=1e-12)
    elif mode == "unrolled":
        weights = fit_gradient_descent(log_reg, design, splits["inner"][1], 2000)
    else:
        weights = fit_newton(log_reg, design, splits["inner"][1], tol=1e-13)
    logits = add_intercept(splits["val"][0]) @ weights
    return F.binary_cross_entropy_with_logits(logits, splits["val"][1])


def test_hypergradient_matches_finite_differences(splits):
    generator = torch.Generator().manual_seed(0)
    log_reg = (torch.randn(30, generator=generator, dtype=torch.float64) - 2).requires_grad_()
    (gradient,) = torch.autograd.grad(validation_loss(log_reg, splits), log_reg)
    step = 1e-5
    for index in (0, 7, 21):
        shift = torch.zeros(30, dtype=torch.float64)
        shift[index] = step
        plus = validation_loss(log_reg.detach() + shift, splits, mode="exact")
        minus = validation_loss(log_reg.detach() - shift, splits, mode="exact")
        finite_difference = (plus - minus) / (2 * step)
        assert torch.isclose(gradient[index], finite_difference, rtol=1e-4, atol=1e-9)


def test_unrolled_hypergradient_converges_to_implicit(splits):
    log_reg = torch.full((30,), -1.0, dtype=torch.float64, requires_grad=True)
    (implicit,) = torch.autograd.grad(validation_loss(log_reg, splits), log_reg)
    (unrolled,) = torch.autograd.grad(validation_loss(log_reg, splits, "unrolled"), log_reg)
    relative_error = (unrolled - implicit).norm() / implicit.norm()
    assert relative_error < 1e-3


def test_training_steps_lower_validation_loss(splits):
    model = BilevelLogisticRegression(lr=0.3)
    datamodule = BreastCancerBilevelDataModule(batch_size=200)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = model.configure_optimizers()
    before = evaluate_split(model, splits, "val")["loss"]
    for _ in range(8):
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()
    after = evaluate_split(model, splits, "val")["loss"]
    assert after < 0.8 * before


def test_bilevel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hypergradient must be one of"):
        BilevelLogisticRegression(hypergradient="finite")
    with pytest.raises(ValueError, match="inner_steps must be at least 1"):
        BilevelLogisticRegression(inner_steps=0)
    with pytest.raises(ValueError, match="leaves no test samples"):
        BreastCancerBilevelDataModule(inner_size=400, val_size=200)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        BreastCancerBilevelDataModule(batch_size=0)
    model = BilevelLogisticRegression(num_features=5)
    batch = {
        "inner_features": torch.zeros(4, 30),
        "inner_labels": torch.zeros(4),
        "outer_features": torch.zeros(2, 30),
        "outer_labels": torch.zeros(2),
    }
    with pytest.raises(ValueError, match="num_features=5"):
        model.training_step(batch, 0)


def test_bilevel_trains_under_two_process_ddp(tmp_path):
    process = run_zoo(
        [
            "train",
            "opt-bilevel-breast-cancer",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
        ],
        cwd=tmp_path,
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert "max_steps=2" in process.stdout + process.stderr
    assert (tmp_path / "runs" / "opt-bilevel-breast-cancer" / "checkpoints" / "last.ckpt").is_file()


def test_pretrained_checkpoint_reproduces_manifest(splits):
    import zoo

    module = zoo.load_pretrained("opt-bilevel-breast-cancer").eval()
    manifest = module.zoo_pretrained
    metrics = evaluate_split(module, splits, "test")
    assert metrics["loss"] == pytest.approx(manifest["metric"]["value"], abs=1e-8)
    assert metrics["accuracy"] == pytest.approx(manifest["extra"]["test_accuracy"], abs=1e-12)
    # The tuned model beats the untuned start (every log-strength 0) on held-out data.
    untuned = evaluate_split(BilevelLogisticRegression(), splits, "test")
    assert metrics["loss"] < untuned["loss"]


def _epoch_order(loader: torch.utils.data.DataLoader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [batch["outer_labels"] for batch in loader]


def test_training_order_depends_only_on_seed_and_epoch():
    # A run resumed with --ckpt_path last builds a fresh loader and must see the batches of
    # the epoch it resumes in, not those of epoch 0 again.
    datamodule = BreastCancerBilevelDataModule()
    datamodule.setup()
    first = datamodule.train_dataloader()
    _epoch_order(first, 0)
    uninterrupted = _epoch_order(first, 1)
    resumed = _epoch_order(datamodule.train_dataloader(), 1)
    assert len(uninterrupted) == len(resumed)
    for expected, actual in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(expected, actual)
    epoch_zero = torch.cat(_epoch_order(datamodule.train_dataloader(), 0))
    assert not torch.equal(torch.cat(resumed), epoch_zero)
