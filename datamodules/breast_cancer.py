"""scikit-learn's bundled Wisconsin breast-cancer data, split for bilevel hyperparameter tuning."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.datamodules.sampling import seeded_loader

logger = logging.getLogger(__name__)

NUM_SAMPLES = 569
NUM_FEATURES = 30


def load_breast_cancer_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 569 x 30 features (float64) and the 0/1 labels (float64, 1 = benign)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    features = torch.as_tensor(bunch.data, dtype=torch.float64)
    labels = torch.as_tensor(bunch.target, dtype=torch.float64)
    return features, labels


class _OuterRows(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]


class AttachInnerSet:
    """Collate outer rows into a batch that also carries the whole inner training split.

    Each batch is a dict with ``inner_features`` ``(N_in, D)``, ``inner_labels`` ``(N_in,)``,
    ``outer_features`` ``(B, D)`` and ``outer_labels`` ``(B,)``. A class rather than a closure
    so that DataLoader workers can pickle it.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __call__(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        outer_features = torch.stack([row[0] for row in rows])
        outer_labels = torch.stack([row[1] for row in rows])
        return {
            "inner_features": self.features,
            "inner_labels": self.labels,
            "outer_features": outer_features,
            "outer_labels": outer_labels,
        }


class BreastCancerBilevelDataModule(pl.LightningDataModule):
    """Breast-cancer data (Street, Wolberg and Mangasarian, 1993) for tuning a regularizer.

    The 569 samples are split by a seeded permutation into an inner training set (the
    classifier's weights are fit on it), an outer validation set (the hyperparameters are
    tuned on it) and a test set. Features are standardized with the inner set's mean and
    standard deviation. The data ships with scikit-learn, so nothing is downloaded.

    The training loader iterates over the outer validation rows in shuffled mini-batches, and
    every batch carries the full inner set (see :class:`AttachInnerSet`). Under DDP each
    process thus receives different outer rows but the same inner problem. The validation and
    test loaders give one batch with the whole validation or test set as outer rows.

    Args:
        data_dir: Unused, because the data ships with scikit-learn; kept so that every
            datamodule of the zoo takes the same argument.
        inner_size: Number of samples in the inner training set.
        val_size: Number of samples in the outer validation set; the rest is the test set.
        batch_size: Outer rows per training batch.
        seed: Seed of the split and of the shuffle.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        inner_size: int = 150,
        val_size: int = 200,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("inner_size", inner_size),
            ("val_size", val_size),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        if inner_size + val_size >= NUM_SAMPLES:
            raise ValueError(
                f"inner_size={inner_size} plus val_size={val_size} leaves no test samples: the "
                f"data set has {NUM_SAMPLES} samples. Lower one of them."
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.inner_size = inner_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.seed = seed
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the data and build the seeded, standardized split."""
        if self.splits is not None:
            return
        features, labels = load_breast_cancer_tensors()
        order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(self.seed))
        inner = order[: self.inner_size]
        val = order[self.inner_size : self.inner_size + self.val_size]
        test = order[self.inner_size + self.val_size :]
        mean = features[inner].mean(0)
        std = features[inner].std(0).clamp_min(1e-12)
        features = (features - mean) / std
        self.splits = {
            "inner": (features[inner], labels[inner]),
            "val": (features[val], labels[val]),
            "test": (features[test], labels[test]),
        }
        logger.info(
            "Breast-cancer split: %d inner, %d validation, %d test samples",
            len(inner),
            len(val),
            len(test),
        )

    def _require(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.splits is None:
            raise RuntimeError("The breast-cancer data is not loaded: call setup() first.")
        return self.splits

    def train_dataloader(self) -> DataLoader:
        """Return shuffled mini-batches of validation rows, each with the full inner set."""
        splits = self._require()
        # Shuffled by seed and epoch, so a run resumed with --ckpt_path last sees the same
        # batches as an uninterrupted one.
        return seeded_loader(
            _OuterRows(*splits["val"]),
            batch_size=self.batch_size,
            seed=self.seed,
            collate_fn=AttachInnerSet(*splits["inner"]),
        )

    def _whole_split_loader(self, name: str) -> DataLoader:
        splits = self._require()
        rows = _OuterRows(*splits[name])
        return DataLoader(rows, batch_size=len(rows), collate_fn=AttachInnerSet(*splits["inner"]))

    def val_dataloader(self) -> DataLoader:
        """Return one batch: the whole validation set as outer rows."""
        return self._whole_split_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Return one batch: the whole test set as outer rows."""
        return self._whole_split_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Return one batch: the whole test set as outer rows (labels are ignored)."""
        return self._whole_split_loader("test")
