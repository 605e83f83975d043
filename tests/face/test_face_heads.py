"""Margin heads: values, NaN safety at cos = +-1 and in reduced precision, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.face.heads import (
    ArcFace,
    CosFace,
    MagFace,
    additive_angular_margin,
    build_head,
)

HEAD_CLASSES = [ArcFace, CosFace, MagFace]


def _head(cls, embedding_size: int = 8, num_classes: int = 5, **kwargs):
    torch.manual_seed(0)
    return cls(embedding_size, num_classes, **kwargs)


def _assert_finite_loss_and_grads(head, embeddings, labels) -> None:
    embeddings = embeddings.detach().requires_grad_(True)
    loss = head(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss), f"loss is {loss}"
    assert torch.isfinite(embeddings.grad).all(), "embedding gradient is not finite"
    assert torch.isfinite(head.weight.grad).all(), "proxy gradient is not finite"


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_head_finite_at_cosine_plus_minus_one(cls) -> None:
    head = _head(cls)
    proxies = head.weight.detach()
    # Rows 0-4 point exactly at their own proxy (cos = +1), rows 5-9 exactly away (cos = -1).
    embeddings = torch.cat([20 * proxies, -20 * proxies])
    labels = torch.arange(5).repeat(2)
    cosine = head.cosine(embeddings).gather(1, labels[:, None]).squeeze(1)
    assert cosine[:5].min() > 1 - 1e-6
    assert cosine[5:].max() < -1 + 1e-6
    _assert_finite_loss_and_grads(head, embeddings, labels)


def test_margin_finite_gradient_at_exact_bounds() -> None:
    cosine = torch.tensor([1.0, -1.0, 0.0], requires_grad=True)
    for easy_margin in (False, True):
        value = additive_angular_margin(cosine, 0.5, easy_margin=easy_margin)
        value.sum().backward()
        assert torch.isfinite(value).all()
        assert torch.isfinite(cosine.grad).all()
        cosine.grad = None


@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_reduced_precision_inputs(cls, dtype) -> None:
    head = _head(cls, embedding_size=16, num_classes=7)
    torch.manual_seed(1)
    embeddings = 12 * torch.randn(32, 16)
    labels = torch.randint(0, 7, (32,))
    reference = head(embeddings, labels)
    low_head = _head(cls, embedding_size=16, num_classes=7).to(dtype)
    low_embeddings = embeddings.to(dtype)
    _assert_finite_loss_and_grads(low_head, low_embeddings, labels)
    low_loss = low_head(low_embeddings, labels)
    assert low_loss.dtype == torch.float32
    assert abs(low_loss.item() - reference.item()) < 0.05 * abs(reference.item()) + 0.5


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_head_under_bf16_autocast(cls) -> None:
    head = _head(cls, embedding_size=16, num_classes=7)
    linear = torch.nn.Linear(16, 16)
    inputs = torch.randn(32, 16)
    labels = torch.randint(0, 7, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = linear(inputs)
        assert embeddings.dtype == torch.bfloat16
        loss = head(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(linear.weight.grad).all()


def test_arcface_logits_match_formula() -> None:
    head = _head(ArcFace, margin=0.5)
    embeddings = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    output = head.margin_logits(embeddings, labels)
    cosine = F.normalize(embeddings) @ F.normalize(head.weight).t()
    theta = torch.acos(cosine.gather(1, labels[:, None]).squeeze(1))
    expected_target = torch.where(
        theta + 0.5 <= math.pi,
        torch.cos(theta + 0.5),
        torch.cos(theta) - 0.5 * math.sin(0.5),
    )
    target = output.logits.gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(target, expected_target, atol=1e-5)
    others = torch.ones_like(cosine, dtype=torch.bool).scatter(1, labels[:, None], False)
    assert torch.allclose(output.logits[others], cosine[others], atol=1e-6)
    assert output.regularizer.item() == 0.0


def test_arcface_fallback_is_monotonic() -> None:
    cosine = torch.linspace(1.0, -1.0, 2001)
    logits = additive_angular_margin(cosine, 0.5)
    assert (logits[1:] <= logits[:-1] + 1e-6).all(), "logit must not rise as theta grows"
    past_pi = cosine < math.cos(math.pi - 0.5)
    assert torch.allclose(logits[past_pi], cosine[past_pi] - 0.5 * math.sin(0.5), atol=1e-6)


def test_cosface_subtracts_margin() -> None:
    head = _head(CosFace, margin=0.35)
    embeddings = torch.randn(4, 8)
    labels = torch.tensor([1, 2, 3, 4])
    output = head.margin_logits(embeddings, labels)
    cosine = head.cosine(embeddings)
    expected = cosine.gather(1, labels[:, None]) - 0.35
    assert torch.allclose(output.logits.gather(1, labels[:, None]), expected, atol=1e-6)


def test_magface_margin_and_regularizer() -> None:
    head = _head(MagFace, lambda_g=35.0)
    direction = F.normalize(torch.randn(2, 8), dim=1)
    # Norms at the lower and upper bounds give the lower and upper margins.
    embeddings = torch.cat([10.0 * direction[:1], 110.0 * direction[1:]])
    labels = torch.tensor([0, 1])
    output = head.margin_logits(embeddings, labels)
    cosine = head.cosine(embeddings).gather(1, labels[:, None]).squeeze(1)
    expected = torch.cos(torch.acos(cosine) + torch.tensor([0.45, 0.8]))
    got = output.logits.gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(got, expected, atol=1e-5)
    regularizer = 35.0 * ((1 / 10 + 10 / 110**2) + (1 / 110 + 110 / 110**2)) / 2
    assert output.regularizer.item() == pytest.approx(regularizer, rel=1e-5)


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_head_gradient_matches_finite_differences(cls) -> None:
    head = _head(cls, embedding_size=5, num_classes=4, scale=8.0).double()
    torch.manual_seed(2)
    # Norms between 10 and 110 keep MagFace away from its clamp points.
    embeddings = (30 * torch.randn(6, 5, dtype=torch.float64)).requires_grad_(True)
    weight = head.weight.detach().clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])

    def loss(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(head, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(loss, (embeddings, weight))


def test_head_rejects_bad_input() -> None:
    head = _head(ArcFace)
    with pytest.raises(ValueError, match="labels must lie in"):
        head(torch.randn(2, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="embeddings of shape"):
        head(torch.randn(2, 9), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="margin"):
        ArcFace(8, 5, margin=2.0)
    with pytest.raises(ValueError, match="Unknown margin head 'sphereface'"):
        build_head("sphereface", 8, 5)
