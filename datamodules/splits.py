"""Loaders of a datamodule that keeps its train, validation and test sets in memory."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from zoo.datamodules.sampling import seeded_loader


class SplitLoaders:
    """Mixin giving a LightningDataModule its four loaders from three dataset attributes.

    The datamodule sets ``train_set``, ``val_set`` and ``test_set`` in ``setup`` and
    ``batch_size``, ``seed`` and ``num_workers`` in its constructor. The training loader
    shuffles by ``seed`` and epoch (:func:`~zoo.datamodules.sampling.seeded_loader`); the
    others keep a fixed order, and prediction runs over the test set.
    """

    #: Name of the data in the error raised before ``setup``, for example ``"MNIST"``.
    dataset_name = "dataset"
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None
    batch_size: int
    seed: int
    num_workers: int

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled training loader; the shuffle order follows ``seed``."""
        return seeded_loader(
            self._require(self.train_set, "train"),
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader in fixed order."""
        return self._eval_loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        """Return the test loader in fixed order."""
        return self._eval_loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        """Return the test examples for prediction."""
        return self._eval_loader(self.test_set, "test")

    def _eval_loader(self, dataset: Dataset | None, split: str) -> DataLoader:
        return DataLoader(
            self._require(dataset, split),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def _require(self, dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(
                f"The {self.dataset_name} {split} set is not loaded: call setup() first."
            )
        return dataset
