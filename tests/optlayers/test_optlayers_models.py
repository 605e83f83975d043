"""The QP-layer classifier and dataset distillation: learning, DDP and shipped checkpoints."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_zoo
from zoo.datamodules.digits import DigitsDataModule
from zoo.optlayers.distillation import DatasetDistillation, accuracy_of_training_set
from zoo.optlayers.optnet import QPBlock, QPNetClassifier, evaluate_accuracy


@pytest.fixture(autouse=True)
def single_thread():
    """Run with one intra-op thread: the solvers' many tiny batched operations get slower,
    not faster, from thread synchronization on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    datamodule = DigitsDataModule()
    datamodule.setup()
    return datamodule


def test_qp_block_gradients_match_finite_differences():
    torch.manual_seed(0)
    block = QPBlock(dim=4, num_constraints=3, tol=1e-12).double()
    linear_term = (3 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(block, (linear_term,), atol=1e-5)
    # The constraints bind for some element, so the test exercises the inequality part.
    assert (block.qp.last_solution.ineq_dual > 1e-6).any()


def test_qpnet_learns_digits_in_few_steps(digits):
    torch.manual_seed(0)
    model = QPNetClassifier(lr=0.02)
    optimizer = model.configure_optimizers()
    images, labels = digits.train_set.tensors
    for step in range(60):
        index = torch.arange(step * 16, step * 16 + 64) % len(labels)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
        loss.backward()
        optimizer.step()
    accuracy = evaluate_accuracy(model, *digits.val_set.tensors)
    assert accuracy > 0.6  # chance is 0.1


def test_qpnet_rejects_wrong_input_size():
    model = QPNetClassifier()
    with pytest.raises(ValueError, match="Expected 64 values per example, got 49"):
        model(torch.zeros(2, 1, 7, 7))
    with pytest.raises(ValueError, match="qp_dim must be at least 1"):
        QPNetClassifier(qp_dim=0)


def test_distillation_hypergradient_matches_finite_differences(digits):
    torch.manual_seed(0)
    model = DatasetDistillation(l2_reg=0.05, init_scale=0.5, inner_tol=1e-12, adjoint_tol=1e-12)
    images, labels = digits.val_set.tensors

    def outer_loss(weights):
        return torch.nn.functional.cross_entropy(model(images, weights), labels)

    model.distilled.grad = None
    outer_loss(model.classifier_weights()).backward()
    gradient = model.distilled.grad.clone()
    step = 1e-5
    for row, column in ((0, 10), (3, 33), (9, 60)):
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                model.distilled[row, column] += sign * step
                values.append(outer_loss(model.classifier_weights(differentiable=False)))
                model.distilled[row, column] -= sign * step
        finite_difference = (values[0] - values[1]) / (2 * step)
        assert torch.isclose(gradient[row, column], finite_difference, rtol=1e-4, atol=1e-8)


def test_distillation_steps_raise_accuracy(digits):
    torch.manual_seed(0)
    model = DatasetDistillation(lr=0.1)
    optimizer = model.configure_optimizers()
    images, labels = digits.train_set.tensors
    val_images, val_labels = digits.val_set.tensors
    before = (model(val_images).argmax(-1) == val_labels).double().mean()
    for step in range(15):
        index = torch.arange(step * 128, step * 128 + 128) % len(labels)
        optimizer.zero_grad()
        logits = model(images[index], model.classifier_weights())
        torch.nn.functional.cross_entropy(logits, labels[index]).backward()
        optimizer.step()
    after = (model(val_images).argmax(-1) == val_labels).double().mean()
    assert after > before + 0.2


def test_distillation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="images_per_class must be at least 1"):
        DatasetDistillation(images_per_class=0)
    with pytest.raises(ValueError, match="l2_reg must be positive"):
        DatasetDistillation(l2_reg=0.0)
    with pytest.raises(ValueError, match="expected 64"):
        DatasetDistillation()(torch.zeros(3, 1, 4, 4))


@pytest.mark.parametrize("name", ["opt-qpnet-digits", "opt-distill-digits"])
def test_model_trains_under_two_process_ddp(tmp_path, name):
    process = run_zoo(
        [
            "train",
            name,
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
    assert (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").is_file()


def test_qpnet_checkpoint_reproduces_manifest(digits):
    import zoo

    module = zoo.load_pretrained("opt-qpnet-digits")
    expected = module.zoo_pretrained["metric"]["value"]
    assert evaluate_accuracy(module, *digits.test_set.tensors) == pytest.approx(expected, abs=1e-6)
    assert expected > 0.95


def test_distillation_checkpoint_reproduces_manifest(digits):
    import zoo

    module = zoo.load_pretrained("opt-distill-digits")
    manifest = module.zoo_pretrained
    accuracy = accuracy_of_training_set(
        module.distilled.detach(),
        module.distilled_labels,
        *digits.test_set.tensors,
        module.hparams.num_classes,
        module.hparams.l2_reg,
    )
    assert accuracy == pytest.approx(manifest["metric"]["value"], abs=1e-9)
    # Ten distilled images train a better classifier than ten random real ones.
    assert accuracy > manifest["extra"]["random_real_images_test_accuracy"] + 0.05
