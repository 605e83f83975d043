"""UNPG: Tukey filter, negative-pair mining, loss formula and the off switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.face.heads import ArcFace, CosFace, MagFace
from zoo.face.unpg import UNPGLoss, negative_pair_cosines, tukey_fence_filter


def _batch(seed: int = 0, batch: int = 12, dim: int = 8, classes: int = 5):
    generator = torch.Generator().manual_seed(seed)
    embeddings = 15 * torch.randn(batch, dim, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return embeddings, labels


def test_tukey_filter_hand_example() -> None:
    values = torch.tensor([0.95, 0.10, 0.12, -0.9, 0.15, 0.20, 0.22, 0.25, 0.30])
    # Sorted: -0.9, 0.10, 0.12, 0.15, 0.20, 0.22, 0.25, 0.30, 0.95 (n = 9).
    # Q1 = sorted[floor(2.25)] = 0.12, Q3 = sorted[floor(6.75)] = 0.25, IQR = 0.13,
    # fences [0.12 - 0.195, 0.25 + 0.195] = [-0.075, 0.445].
    kept = tukey_fence_filter(values, wisk=1.5)
    expected = torch.tensor([0.10, 0.12, 0.15, 0.20, 0.22, 0.25, 0.30])
    assert torch.equal(kept, expected)


def test_tukey_filter_uses_index_quartiles() -> None:
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    # By index: Q1 = sorted[1] = 1, Q3 = sorted[3] = 3, so wisk = 0 keeps [1, 3].
    # torch.quantile would interpolate to the same here, so also check wisk = 0.5:
    # fences [0, 4] keep 0..3 and drop 10.
    assert tukey_fence_filter(values, wisk=0.0).tolist() == [1.0, 2.0, 3.0]
    assert tukey_fence_filter(values, wisk=0.5).tolist() == [0.0, 1.0, 2.0, 3.0]
    four = torch.tensor([0.0, 1.0, 2.0, 3.0])
    # n = 4: Q1 = sorted[1] = 1 and Q3 = sorted[3] = 3; interpolated quartiles would be
    # 0.75 and 2.25 and keep 1 and 2 only.
    assert tukey_fence_filter(four, wisk=0.0).tolist() == [1.0, 2.0, 3.0]


def test_tukey_filter_edge_cases() -> None:
    empty = torch.empty(0)
    assert tukey_fence_filter(empty).numel() == 0
    values = torch.tensor([-5.0, 0.0, 0.1, 0.2, 9.0])
    assert torch.equal(tukey_fence_filter(values, wisk=math.inf), values)
    with pytest.raises(ValueError, match="wisk must be non-negative"):
        tukey_fence_filter(values, wisk=-1.0)
    with pytest.raises(ValueError, match="1-D"):
        tukey_fence_filter(values.view(1, -1))


def test_negative_pairs_match_loop() -> None:
    embeddings, labels = _batch()
    got = negative_pair_cosines(embeddings, labels)
    normalized = F.normalize(embeddings, dim=1)
    expected = [
        float(normalized[a] @ normalized[b])
        for a in range(len(labels))
        for b in range(a + 1, len(labels))
        if labels[a] != labels[b]
    ]
    assert got.shape == (len(expected),)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("head_class", [ArcFace, CosFace, MagFace])
def test_unpg_off_equals_base_loss_exactly(head_class) -> None:
    torch.manual_seed(0)
    head = head_class(8, 5, scale=30.0)
    embeddings, labels = _batch()
    base = head(embeddings, labels)
    off = UNPGLoss(head, use_negative_pairs=False)(embeddings, labels)
    assert torch.equal(off, base)
    # With negatives on but one label in the batch there is no negative pair, so the loss
    # is the base loss again.
    same = torch.zeros_like(labels)
    on = UNPGLoss(head)(embeddings, same)
    assert torch.equal(on, head(embeddings, same))


def test_unpg_loss_matches_explicit_formula() -> None:
    torch.manual_seed(0)
    head = ArcFace(8, 5, scale=16.0, margin=0.3)
    embeddings, labels = _batch(batch=10)
    unpg = UNPGLoss(head, wisk=1.0)
    loss = unpg(embeddings, labels)
    logits = head.margin_logits(embeddings, labels).logits
    kept = tukey_fence_filter(negative_pair_cosines(embeddings, labels), 1.0)
    # Appending every kept negative as its own column, as the reference implementation does.
    appended = torch.cat([logits, kept.unsqueeze(0).expand(len(labels), -1)], dim=1)
    expected = F.cross_entropy(16.0 * appended, labels)
    assert torch.allclose(loss, expected, rtol=1e-5)
    # And the per-sample formula written out.
    target = logits.gather(1, labels[:, None]).squeeze(1)
    denominator = torch.exp(16 * logits).sum(1) + torch.exp(16 * kept).sum()
    manual = -(16 * target - torch.log(denominator)).mean()
    assert torch.allclose(loss, manual, rtol=1e-5)
    assert loss > head(embeddings, labels), "extra negatives must raise the loss"


def test_unpg_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    head = CosFace(4, 3, scale=4.0, margin=0.2).double()
    embeddings = torch.randn(7, 4, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    unpg = UNPGLoss(head, wisk=math.inf)
    assert torch.autograd.gradcheck(lambda e: unpg(e, labels), (embeddings,))


def test_unpg_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="MarginHead"):
        UNPGLoss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="wisk"):
        UNPGLoss(ArcFace(4, 2), wisk=-0.5)
