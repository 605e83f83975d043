"""Flip test: evaluation embeddings sum each image's and its mirror image's embeddings."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.face.evaluate import evaluate_verification
from zoo.face.module import FaceRecognitionModule


def _model(flip_test: bool) -> FaceRecognitionModule:
    torch.manual_seed(0)
    model = FaceRecognitionModule(
        num_classes=3, backbone_kwargs={"input_size": 16, "width": 8}, flip_test=flip_test
    )
    return model.eval()


def _images(count: int = 4) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(count, 1, 16, 16, generator=generator) * 2 - 1


def test_flip_test_keeps_symmetric_input() -> None:
    images = _images()
    symmetric = (images + images.flip(3)) / 2
    assert torch.equal(symmetric, symmetric.flip(3))
    with torch.no_grad():
        flipped = _model(flip_test=True).embed(symmetric)
        plain = _model(flip_test=False).embed(symmetric)
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)


def test_flip_test_sums_mirror_embedding() -> None:
    images = _images()
    model = _model(flip_test=True)
    with torch.no_grad():
        embedded = model.embed(images)
        expected = torch.nn.functional.normalize(model(images) + model(images.flip(3)), dim=1)
        plain = torch.nn.functional.normalize(model(images), dim=1)
    torch.testing.assert_close(embedded, expected)
    torch.testing.assert_close(embedded.norm(dim=1), torch.ones(len(images)))
    assert (embedded - plain).abs().max() > 1e-3, "flip test did not change the embedding"


def test_flip_test_switched_off() -> None:
    images = _images()
    model = _model(flip_test=False)
    with torch.no_grad():
        embedded = model.embed(images)
        expected = torch.nn.functional.normalize(model(images), dim=1)
    torch.testing.assert_close(embedded, expected)


def _record_backbone_inputs(model: FaceRecognitionModule) -> list[Tensor]:
    inputs: list[Tensor] = []
    model.backbone.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    return inputs


def test_validation_step_applies_flip_test() -> None:
    images = _images()
    model = _model(flip_test=True)
    inputs = _record_backbone_inputs(model)
    with torch.no_grad():
        model.validation_step((images, torch.tensor([0, 0, 1, 1]), torch.arange(4)), 0)
    assert len(inputs) == 2
    assert torch.equal(inputs[0], images)
    assert torch.equal(inputs[1], images.flip(3))


class _PairData:
    """Minimal stand-in for a set-up FaceDataModule: images and a pair list."""

    def __init__(self, images: Tensor) -> None:
        self.val_set = [(image, 0, index) for index, image in enumerate(images)]
        self.verification_pairs = torch.tensor([[0, 1, 1], [2, 3, 1], [0, 2, 0], [1, 3, 0]])


def test_evaluate_verification_applies_flip_test() -> None:
    images = _images()
    model = _model(flip_test=True)
    model.hparams.num_folds = 2
    inputs = _record_backbone_inputs(model)
    evaluate_verification(model, _PairData(images), batch_size=4)
    assert len(inputs) == 2
    assert torch.equal(inputs[1], images.flip(3))
