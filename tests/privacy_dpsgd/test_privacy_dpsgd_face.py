"""DPFaceRecognitionModule: exact per-sample gradients and a DP-SGD fit with a matching epsilon."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from PIL import Image

from tests.helpers import quiet_trainer
from zoo.datamodules.faces import FaceDataModule
from zoo.privacy.compatibility import make_trainable_with_dp
from zoo.privacy.dpsgd import DPSGD
from zoo.privacy.face import DPFaceRecognitionModule, arcface_loss

DELTA = 1e-5
# Opacus' fixer gives GroupNorm min(32, channels) groups; 64 embedding channels and 2 x 2
# final feature maps leave more than one value per group even for a single example.
BACKBONE = {"embedding_size": 64, "in_channels": 1, "input_size": [32, 32], "width": 4}


def _module(num_classes: int = 5) -> DPFaceRecognitionModule:
    torch.manual_seed(0)
    return DPFaceRecognitionModule(
        num_classes=num_classes, backbone_kwargs=BACKBONE, lr=0.05, num_folds=2
    )


def test_dp_face_grad_samples_match_autograd() -> None:
    module = _module()
    make_trainable_with_dp(module, fix=True)  # BatchNorm -> GroupNorm, as the callback does
    module.double()
    module.train()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 1, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])

    expected = []
    for index in range(len(images)):
        module.zero_grad()
        module.training_loss(images[index : index + 1], labels[index : index + 1]).backward()
        expected.append({name: p.grad.clone() for name, p in module.named_parameters()})

    wrapped = GradSampleModule(module, loss_reduction="mean")
    module.zero_grad()
    module.training_loss(images, labels).backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad_sample is not None, name
        for index in range(len(images)):
            torch.testing.assert_close(
                parameter.grad_sample[index], expected[index][name], rtol=1e-6, atol=1e-9
            )
    wrapped._close()


def test_arcface_loss_applies_margin_to_target_only() -> None:
    cosines = torch.tensor([[0.8, 0.1], [0.2, 0.6]])
    labels = torch.tensor([0, 1])
    with_margin = arcface_loss(cosines, labels, scale=10.0, margin=0.5)
    without_margin = arcface_loss(cosines, labels, scale=10.0, margin=0.0)
    plain = torch.nn.functional.cross_entropy(10.0 * cosines, labels)
    torch.testing.assert_close(without_margin, plain)
    assert with_margin > without_margin


def _write_identity_folders(root: Path, identities: int = 8, images: int = 6) -> None:
    rng = np.random.default_rng(0)
    for identity in range(identities):
        pattern = rng.uniform(0, 255, size=(32, 32))
        folder = root / f"s{identity + 1}"
        folder.mkdir(parents=True)
        for index in range(images):
            noisy = np.clip(pattern + rng.normal(0, 20, size=(32, 32)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{index + 1}.png")


def test_dp_face_fit_epsilon_equals_accountant(tmp_path: Path) -> None:
    _write_identity_folders(tmp_path / "faces")
    data = FaceDataModule(
        data_dir=str(tmp_path),
        root="faces",
        num_val_identities=3,
        image_size=[32, 32],
        channels=1,
        batch_size=10,
        augment=False,
        download=False,
    )
    module = _module(num_classes=5)
    before = module.proxies.weight.detach().clone()
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp", seed=0)
    trainer = quiet_trainer([dpsgd], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, data)

    sample_rate = 1 / len(data.train_dataloader())
    assert dpsgd.sample_rate == sample_rate
    assert dpsgd.steps == trainer.global_step == 6
    reference = RDPAccountant()
    for _ in range(dpsgd.steps):
        reference.step(noise_multiplier=1.0, sample_rate=sample_rate)
    expected = reference.get_epsilon(delta=DELTA)
    assert np.isfinite(dpsgd.epsilon())
    assert dpsgd.epsilon() == pytest.approx(expected, rel=1e-12)
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(expected, rel=1e-6)
    assert 0.0 <= trainer.callback_metrics["val/accuracy"].item() <= 1.0
    assert not torch.equal(module.proxies.weight.detach(), before)
