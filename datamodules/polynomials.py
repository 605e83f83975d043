"""Gaussian samples labelled by a hierarchical polynomial ``h = g(p(x))``.

The data is generated from its definition (``zoo.polynomials.targets``), so nothing is
downloaded. Each split is drawn from its own seeded stream, so the train, validation and
test samples are independent and repeat exactly for a given ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.datamodules.sampling import seeded_loader
from zoo.polynomials.targets import HierarchicalPolynomial

logger = logging.getLogger(__name__)

__all__ = ["HierarchicalPolynomialDataModule", "PolynomialSamples"]


class PolynomialSamples(Dataset):
    """In-memory samples; items are dicts with ``x``, ``y``, ``p`` and ``part``.

    ``part`` marks which stage of the layerwise model may use a training sample: 0 for the
    feature-learning sample D1 and 1 for the link-fitting sample D2. Evaluation samples
    have part 0.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, part: torch.Tensor
    ) -> None:
        self.x, self.y, self.p, self.part = x, y, p, part

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "x": self.x[index],
            "y": self.y[index],
            "p": self.p[index],
            "part": self.part[index],
        }


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}.")


class HierarchicalPolynomialDataModule(pl.LightningDataModule):
    """Serves ``x ~ N(0, I_d)`` with labels ``y = g(p(x))`` and the hidden feature ``p(x)``.

    The training set contains ``num_feature_samples`` samples of D1 (part 0) followed by
    ``num_link_samples`` samples of D2 (part 1). Models that do not use the split (the
    baselines) train on both. Validation and test labels are noise-free, so their error
    is the error against h itself.

    Args:
        input_dim: Input dimension d.
        feature_degree: Degree k of the hidden feature p.
        link_coefficients: Hermite coefficients ``[c_0, ..., c_q]`` of the link g.
        num_directions: Number r of directions in p; None uses d.
        num_feature_samples: Size n1 of D1.
        num_link_samples: Size n2 of D2.
        num_val_samples: Size of the validation set.
        num_test_samples: Size of the test set.
        noise_std: Standard deviation of Gaussian noise added to the training labels.
        batch_size: Samples per batch.
        seed: Seed of the target (directions and signs of p), and of the sample draws
            unless ``sample_seed`` is set.
        sample_seed: Seed of the sample draws alone, to draw new samples of the same
            target (for example to refit a pretrained model); None uses ``seed``.
        num_workers: DataLoader worker processes.
        data_dir: Unused, because the samples are generated in memory; accepted so that
            every zoo datamodule takes the same arguments.

    Raises:
        ValueError: If a size or the noise level is out of range, or the target is
            ill-posed (see ``HierarchicalPolynomial``).
    """

    def __init__(
        self,
        input_dim: int = 16,
        feature_degree: int = 2,
        link_coefficients: Sequence[float] = (0.0, 1.0, 0.0, 1.0),
        num_directions: int | None = None,
        num_feature_samples: int = 16384,
        num_link_samples: int = 16384,
        num_val_samples: int = 4096,
        num_test_samples: int = 10000,
        noise_std: float = 0.0,
        batch_size: int = 2048,
        seed: int = 0,
        sample_seed: int | None = None,
        num_workers: int = 0,
        data_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_count("num_feature_samples", num_feature_samples, 1)
        _check_count("num_link_samples", num_link_samples, 2)
        _check_count("num_val_samples", num_val_samples, 2)
        _check_count("num_test_samples", num_test_samples, 2)
        _check_count("batch_size", batch_size, 1)
        _check_count("num_workers", num_workers, 0)
        if not noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got noise_std={noise_std!r}.")
        self.save_hyperparameters()
        # Built here, not in setup(), so that bad degrees or links fail at construction.
        self.target = HierarchicalPolynomial(
            input_dim, feature_degree, list(link_coefficients), num_directions, seed=seed
        )
        self.input_dim = input_dim
        self.feature_degree = feature_degree
        self.train_set: PolynomialSamples | None = None
        self.val_set: PolynomialSamples | None = None
        self.test_set: PolynomialSamples | None = None

    def _draw(
        self, stream: int, num_samples: int, noise_std: float, part: int
    ) -> PolynomialSamples:
        # Each split draws from its own generator, seeded by one word of SeedSequence(seed).
        sample_seed = (
            self.hparams.seed if self.hparams.sample_seed is None else self.hparams.sample_seed
        )
        seeds = np.random.SeedSequence(sample_seed).generate_state(4, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(seeds[stream]) >> 1)
        x, y, p = self.target.sample(num_samples, generator, noise_std)
        return PolynomialSamples(x, y, p, torch.full((num_samples,), part, dtype=torch.long))

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            feature = self._draw(0, hp.num_feature_samples, hp.noise_std, part=0)
            link = self._draw(1, hp.num_link_samples, hp.noise_std, part=1)
            self.train_set = PolynomialSamples(
                torch.cat([feature.x, link.x]),
                torch.cat([feature.y, link.y]),
                torch.cat([feature.p, link.p]),
                torch.cat([feature.part, link.part]),
            )
            logger.info(
                "Generated %d + %d training samples of h = g(p(x)) with d=%d, k=%d, q=%d.",
                hp.num_feature_samples,
                hp.num_link_samples,
                hp.input_dim,
                hp.feature_degree,
                self.target.link_degree,
            )
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._draw(2, hp.num_val_samples, 0.0, part=0)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._draw(3, hp.num_test_samples, 0.0, part=0)

    def _loader(self, dataset: PolynomialSamples | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() with the matching stage before requesting a loader.")
        return seeded_loader(
            dataset,
            batch_size=self.hparams.batch_size,
            seed=self.hparams.seed,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
