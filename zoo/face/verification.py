"""Face-verification metrics on scored pairs.

- 10-fold accuracy as in the LFW protocol: for each fold, the threshold that maximises
  accuracy on the other nine folds is applied to that fold; the mean and standard deviation
  over folds are reported. Scores are compared in float64.
- TAR at a given FAR: the largest true-accept rate on the ROC curve whose false-accept rate
  does not exceed the target (torchmetrics ``binary_roc``).
- ROC AUC (torchmetrics ``binary_auroc``).
- The smallest genuine score (inf S^p) and the largest impostor score (sup S^n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_roc


def _check_pairs(scores: Tensor, is_same: Tensor) -> None:
    if scores.ndim != 1 or scores.shape != is_same.shape:
        raise ValueError(
            "scores and is_same must be 1-D tensors of the same length, got shapes "
            f"{tuple(scores.shape)} and {tuple(is_same.shape)}."
        )
    positives = int(is_same.sum())
    if positives == 0 or positives == is_same.numel():
        raise ValueError(
            f"Verification needs both genuine and impostor pairs, got {positives} genuine of "
            f"{is_same.numel()} pairs; check the pair list."
        )


def best_threshold(scores: Tensor, is_same: Tensor) -> float:
    """Return a threshold t maximising the accuracy of the rule ``score >= t``.

    Every cut between two neighbouring distinct scores is a candidate, plus +inf (reject
    all). The threshold is the midpoint between the scores on either side of the cut (the
    lowest score when all pairs are accepted). Among equally accurate cuts the highest wins.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order].double()
    sorted_same = is_same[order].bool()
    true_accepts = torch.cumsum(sorted_same, 0)
    false_accepts = torch.cumsum(~sorted_same, 0)
    negatives = int((~sorted_same).sum())
    correct = true_accepts + (negatives - false_accepts)
    # Only the last position of a run of equal scores is a valid cut for ``score >= t``.
    group_end = torch.ones_like(sorted_same)
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    correct = torch.where(group_end, correct, torch.full_like(correct, -1))
    best = int(torch.argmax(correct))
    if negatives >= int(correct[best]):
        return float("inf")
    if best + 1 == len(sorted_scores):
        return float(sorted_scores[best])
    return float((sorted_scores[best] + sorted_scores[best + 1]) / 2)


def kfold_accuracy(
    scores: Tensor, is_same: Tensor, num_folds: int = 10, seed: int = 0
) -> tuple[float, float, float]:
    """Compute k-fold verification accuracy with thresholds chosen on the other folds.

    Pairs are assigned to folds by a permutation seeded with ``seed``.

    Returns:
        (mean accuracy, standard deviation over folds, mean threshold).
    """
    _check_pairs(scores, is_same)
    if not 2 <= num_folds <= scores.numel():
        raise ValueError(
            f"num_folds must be between 2 and the number of pairs ({scores.numel()}), "
            f"got {num_folds}."
        )
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(scores.numel(), generator=generator)
    folds = permutation.tensor_split(num_folds)
    accuracies, thresholds = [], []
    scores, is_same = scores.detach().cpu().double(), is_same.detach().cpu().bool()
    for index, test in enumerate(folds):
        train = torch.cat([fold for other, fold in enumerate(folds) if other != index])
        threshold = best_threshold(scores[train], is_same[train])
        predicted = scores[test] >= threshold
        accuracies.append(float((predicted == is_same[test]).double().mean()))
        thresholds.append(threshold)
    accuracy = torch.tensor(accuracies, dtype=torch.float64)
    return float(accuracy.mean()), float(accuracy.std()), float(torch.tensor(thresholds).mean())


def tar_at_far(scores: Tensor, is_same: Tensor, far: float) -> float:
    """Return the largest true-accept rate whose false-accept rate is at most ``far``."""
    _check_pairs(scores, is_same)
    if not 0 <= far <= 1:
        raise ValueError(f"far must be in [0, 1], got {far!r}.")
    fpr, tpr, _ = binary_roc(scores.float(), is_same.long())
    return float(tpr[fpr <= far].max())


def verification_metrics(
    scores: Tensor,
    is_same: Tensor,
    num_folds: int = 10,
    fars: Sequence[float] = (1e-2, 1e-3),
    seed: int = 0,
) -> dict[str, float]:
    """Compute every verification metric of a scored pair list.

    Args:
        scores: 1-D similarity scores (higher means more likely the same person).
        is_same: 1-D booleans, True for genuine pairs.
        num_folds: folds of the accuracy protocol (10 as in LFW).
        fars: false-accept rates at which to report the true-accept rate.
        seed: seed of the fold assignment.

    Returns:
        A dict with keys ``accuracy``, ``accuracy_std``, ``threshold``, ``auc``,
        ``min_genuine``, ``max_impostor`` and ``tar_at_far_<far>`` for each far (for
        example ``tar_at_far_0.01``).
    """
    _check_pairs(scores, is_same)
    scores = scores.detach().cpu().float()
    is_same = is_same.detach().cpu().bool()
    accuracy, accuracy_std, threshold = kfold_accuracy(scores, is_same, num_folds, seed)
    metrics = {
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "threshold": threshold,
        "auc": float(binary_auroc(scores, is_same.long())),
        "min_genuine": float(scores[is_same].min()),
        "max_impostor": float(scores[~is_same].max()),
    }
    for far in fars:
        metrics[f"tar_at_far_{far:g}"] = tar_at_far(scores, is_same, far)
    return metrics


def pair_cosines(embeddings: Tensor, pairs: Tensor) -> Tensor:
    """Return the cosine similarity of each pair (rows ``[left, right]`` index embeddings)."""
    normalized = F.normalize(embeddings.float(), dim=1)
    return (normalized[pairs[:, 0]] * normalized[pairs[:, 1]]).sum(dim=1)
