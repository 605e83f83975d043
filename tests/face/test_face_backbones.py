"""Backbones: output shapes, parameter counts and input validation."""

from __future__ import annotations

import pytest
import torch

from zoo.face.backbones import build_backbone, count_parameters


def test_iresnet18_embeds_112_crops() -> None:
    backbone = build_backbone("iresnet18", in_channels=3, input_size=112).eval()
    with torch.no_grad():
        embeddings = backbone(torch.randn(2, 3, 112, 112))
    assert embeddings.shape == (2, 512)
    assert torch.isfinite(embeddings).all()


@pytest.mark.parametrize(
    ("name", "millions"),
    # Counts of this layout at 112x112 with a 512-d embedding; a layout change moves them.
    [("iresnet18", 24.0), ("iresnet50", 43.6)],
)
def test_iresnet_parameter_counts(name: str, millions: float) -> None:
    backbone = build_backbone(name, in_channels=3, input_size=112)
    assert count_parameters(backbone) / 1e6 == pytest.approx(millions, abs=0.1)


def test_small_cnn_shape_and_errors() -> None:
    backbone = build_backbone("small_cnn", input_size=[32, 48], embedding_size=64).eval()
    assert backbone(torch.randn(3, 1, 32, 48)).shape == (3, 64)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_backbone("small_cnn", input_size=30)
    with pytest.raises(ValueError, match="Unknown backbone 'vgg'"):
        build_backbone("vgg")
    with pytest.raises(TypeError, match="Invalid keyword arguments for backbone 'iresnet18'"):
        build_backbone("iresnet18", depth=3)
