"""scikit-learn's bundled handwritten digits (8 x 8), split into train, validation and test."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from zoo.datamodules.splits import SplitLoaders

logger = logging.getLogger(__name__)

NUM_DIGITS = 1797


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all 1,797 digits as images ``[N, 1, 8, 8]`` in ``[0, 1]`` and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


class DigitsDataModule(SplitLoaders, pl.LightningDataModule):
    """The UCI optical-recognition digits that ship with scikit-learn; needs no download.

    1,797 grey images of 8 x 8 pixels (values 0-16, scaled to [0, 1] and then standardized
    with the training mean and standard deviation), labels 0-9. A permutation seeded by
    ``seed`` assigns ``test_size`` images to the test set, the next ``val_size`` to the
    validation set and the rest to the training set.

    Batches are ``(image, label)`` with ``image`` a float tensor ``[B, 1, 8, 8]``.

    Args:
        data_dir: Unused, because the data ships with scikit-learn; kept so that every
            datamodule of the zoo takes the same argument.
        batch_size: Examples per batch for every loader.
        val_size: Number of validation images.
        test_size: Number of test images.
        seed: Seed of the split and of the training shuffle.
        num_workers: DataLoader worker processes.
    """

    dataset_name = "digits"

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        val_size: int = 300,
        test_size: int = 300,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("val_size", val_size, minimum=0)
        _check_int("test_size", test_size, minimum=0)
        _check_int("seed", seed, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        if val_size + test_size >= NUM_DIGITS:
            raise ValueError(
                f"val_size={val_size} plus test_size={test_size} leaves no training data: the "
                f"digits set has {NUM_DIGITS} images. Lower one of them."
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build the seeded split."""
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        test_index = order[: self.test_size]
        val_index = order[self.test_size : self.test_size + self.val_size]
        train_index = order[self.test_size + self.val_size :]
        mean = images[train_index].mean()
        std = images[train_index].std()
        images = (images - mean) / std
        self.train_set = TensorDataset(images[train_index], labels[train_index])
        self.val_set = TensorDataset(images[val_index], labels[val_index])
        self.test_set = TensorDataset(images[test_index], labels[test_index])
        logger.info(
            "Digits split: %d train, %d validation, %d test images",
            len(train_index),
            len(val_index),
            len(test_index),
        )
