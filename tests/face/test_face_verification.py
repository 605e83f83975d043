"""Verification metrics against scikit-learn and brute force on synthetic scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from zoo.face.pairs import make_verification_pairs
from zoo.face.verification import (
    best_threshold,
    kfold_accuracy,
    pair_cosines,
    tar_at_far,
    verification_metrics,
)


def _synthetic(seed: int = 0, count: int = 2000):
    generator = torch.Generator().manual_seed(seed)
    is_same = torch.rand(count, generator=generator) < 0.5
    scores = torch.randn(count, generator=generator) * 0.2 + is_same.float() * 0.5
    return scores, is_same


def _brute_force_threshold_accuracy(scores: np.ndarray, is_same: np.ndarray) -> float:
    candidates = np.concatenate([np.unique(scores), [np.inf]])
    return max(float(np.mean((scores >= t) == is_same)) for t in candidates)


def test_auc_matches_sklearn() -> None:
    scores, is_same = _synthetic()
    metrics = verification_metrics(scores, is_same)
    assert metrics["auc"] == pytest.approx(roc_auc_score(is_same.numpy(), scores.numpy()), abs=1e-6)


@pytest.mark.parametrize("far", [1e-1, 1e-2, 1e-3])
def test_tar_at_far_matches_sklearn(far: float) -> None:
    scores, is_same = _synthetic(seed=1)
    fpr, tpr, _ = roc_curve(is_same.numpy(), scores.numpy())
    expected = tpr[fpr <= far].max()
    assert tar_at_far(scores, is_same, far) == pytest.approx(expected, abs=1e-6)


def test_best_threshold_matches_brute_force() -> None:
    scores, is_same = _synthetic(seed=2, count=300)
    # Rounding makes ties, which the cut must handle.
    scores = torch.round(scores * 20) / 20
    threshold = best_threshold(scores, is_same)
    accuracy = float(((scores >= threshold) == is_same).double().mean())
    expected = _brute_force_threshold_accuracy(scores.numpy(), is_same.numpy())
    assert accuracy == pytest.approx(expected, abs=1e-9)


def test_kfold_accuracy_matches_manual_folds() -> None:
    scores, is_same = _synthetic(seed=3, count=600)
    mean, std, _ = kfold_accuracy(scores, is_same, num_folds=10, seed=7)
    permutation = torch.randperm(600, generator=torch.Generator().manual_seed(7)).numpy()
    folds = np.array_split(permutation, 10)
    s, y = scores.double().numpy(), is_same.numpy()
    accuracies = []
    for index, test in enumerate(folds):
        train = np.concatenate([f for i, f in enumerate(folds) if i != index])
        distinct = np.unique(s[train])[::-1]
        midpoints = (distinct[:-1] + distinct[1:]) / 2
        # Candidates from the highest down: reject all, the midpoints, accept all.
        candidates = np.concatenate([[np.inf], midpoints, distinct[-1:]])
        train_acc = [np.mean((s[train] >= t) == y[train]) for t in candidates]
        best = candidates[int(np.argmax(train_acc))]
        accuracies.append(np.mean((s[test] >= best) == y[test]))
    assert mean == pytest.approx(np.mean(accuracies), abs=1e-9)
    assert std == pytest.approx(np.std(accuracies, ddof=1), abs=1e-9)
    assert 0.85 < mean < 0.95  # separable but noisy synthetic scores


def test_perfect_and_random_scores() -> None:
    is_same = torch.tensor([True, False] * 50)
    perfect = verification_metrics(is_same.float() + 0.01 * torch.rand(100), is_same)
    assert perfect["accuracy"] == 1.0
    assert perfect["tar_at_far_0.001"] == 1.0
    assert perfect["min_genuine"] > perfect["max_impostor"]
    random = verification_metrics(
        torch.rand(100, generator=torch.Generator().manual_seed(0)), is_same
    )
    assert random["accuracy"] < 0.75


def test_metrics_reject_one_class() -> None:
    with pytest.raises(ValueError, match="both genuine and impostor"):
        verification_metrics(torch.rand(10), torch.ones(10, dtype=torch.bool))


def test_pairs_all_genuine_and_balanced() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    pairs = make_verification_pairs(labels, seed=0)
    genuine = pairs[pairs[:, 2] == 1]
    impostor = pairs[pairs[:, 2] == 0]
    # 3 + 1 + 1 genuine pairs; identity 2 has one image and appears in none.
    assert {tuple(p) for p in genuine[:, :2].tolist()} == {(0, 1), (0, 2), (1, 2), (3, 4), (6, 7)}
    assert len(impostor) == len(genuine)
    assert (labels[impostor[:, 0]] != labels[impostor[:, 1]]).all()
    assert len({tuple(p) for p in impostor[:, :2].tolist()}) == len(impostor)
    assert torch.equal(pairs, make_verification_pairs(labels, seed=0))
    assert not torch.equal(pairs, make_verification_pairs(labels, seed=1))


def test_pair_cosines() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pairs = torch.tensor([[0, 1, 0], [0, 2, 1]])
    assert torch.allclose(pair_cosines(embeddings, pairs), torch.tensor([0.0, 2**-0.5]))
