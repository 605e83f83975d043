"""UCI Adult (Census Income) from the original ``adult.data`` and ``adult.test`` files.

Categorical attributes are one-hot encoded and numeric attributes standardised, both with
statistics fitted on the training split only. The label is 1 for income ``>50K``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from zoo.datamodules.paths import DATA_DIR_ENV, resolve_data_dir
from zoo.datamodules.sampling import seeded_loader

logger = logging.getLogger(__name__)

#: Attribute names in file order, as listed in ``adult.names``.
COLUMNS: tuple[str, ...] = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)
CATEGORICAL_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC_COLUMNS)
#: Marker of a missing value in the UCI files.
MISSING = "?"
FILES: tuple[str, ...] = ("adult.data", "adult.test")
SOURCE_URL = "https://archive.ics.uci.edu/dataset/2/adult"


def read_adult_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse one UCI Adult file into raw attribute strings and binary labels.

    Skips empty lines and the ``|1x3 Cross validator`` comment line that opens
    ``adult.test``, and strips the trailing ``.`` that ``adult.test`` puts after labels.
    Missing values stay as the string ``"?"``.

    Args:
        path: ``adult.data`` or ``adult.test``.

    Returns:
        An object array ``[N, 14]`` of stripped attribute strings in :data:`COLUMNS` order,
        and an int64 array ``[N]`` that is 1 where income is ``>50K``.

    Raises:
        ValueError: if a line does not have 15 fields or its label is not ``<=50K``/``>50K``.
    """
    rows: list[list[str]] = []
    labels: list[int] = []
    with open(path, encoding="ascii") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != len(COLUMNS) + 1:
                raise ValueError(
                    f"{path}:{line_number} has {len(fields)} comma-separated fields, expected "
                    f"{len(COLUMNS) + 1}. The file is not an original UCI Adult file; "
                    f"download it again from {SOURCE_URL}."
                )
            label = fields[-1].rstrip(".")
            if label not in ("<=50K", ">50K"):
                raise ValueError(
                    f"{path}:{line_number} has label {fields[-1]!r}, expected '<=50K' or "
                    f"'>50K' (optionally followed by '.'). Download the file again from "
                    f"{SOURCE_URL}."
                )
            rows.append(fields[:-1])
            labels.append(1 if label == ">50K" else 0)
    return np.array(rows, dtype=object), np.array(labels, dtype=np.int64)


def build_preprocessor() -> ColumnTransformer:
    """Return an unfitted transformer: one-hot categoricals, standardised numerics.

    A missing categorical value (``"?"``) is a category of its own. Categories that appear
    only at test time encode as all zeros. A missing numeric value becomes the training
    mean, that is 0 after standardisation.
    """
    numeric_index = [COLUMNS.index(c) for c in NUMERIC_COLUMNS]
    categorical_index = [COLUMNS.index(c) for c in CATEGORICAL_COLUMNS]
    return ColumnTransformer(
        [
            (
                "categorical",
                OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float64),
                categorical_index,
            ),
            ("numeric", StandardScaler(), numeric_index),
        ]
    )


def _numeric_to_float(raw: np.ndarray) -> np.ndarray:
    """Return a copy of ``raw`` whose numeric columns are floats, NaN where missing."""
    out = raw.copy()
    for name in NUMERIC_COLUMNS:
        index = COLUMNS.index(name)
        column = out[:, index]
        out[:, index] = np.array(
            [np.nan if value == MISSING else float(value) for value in column], dtype=np.float64
        )
    return out


class FullBatchTensorDataset(TensorDataset):
    """A TensorDataset that a DataLoader reads a whole batch from with one indexing call.

    PyTorch's map-style fetcher calls ``__getitems__`` with the batch's index list when a
    dataset defines it. Returning the batch as a single item, unwrapped again by
    :func:`first_item`, replaces ``batch_size`` single-record lookups and a ``stack``.
    Sampler replacement (for example Lightning's ``DistributedSampler``) is unaffected,
    because only the index list changes.
    """

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [tuple(tensor[index] for tensor in self.tensors)]


def first_item(batch: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Return the one item that :meth:`FullBatchTensorDataset.__getitems__` put in a list."""
    return batch[0]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


class AdultDataModule(pl.LightningDataModule):
    """UCI Adult census income: predict whether income exceeds 50K from 14 attributes.

    Reads ``<data_dir>/adult/uci/adult.data`` (32,561 rows, split into train and
    validation with a seeded permutation) and ``adult.test`` (16,281 rows, the test split).
    Batches are ``(features, label)``: float32 ``[B, num_features]`` and int64 ``[B]``.

    ``batch_size=-1`` selects full-batch mode for full-gradient methods such as DP-GD and
    DIFF2: every loader yields its whole split as one batch in a fixed order. When a trainer
    with ``world_size`` processes is attached in this mode, the training split is cut to a
    multiple of ``world_size`` by dropping at most ``world_size - 1`` records. Lightning's
    ``DistributedSampler`` then hands each process a disjoint shard of equal size and pads
    nothing. Padding would repeat records across processes, which breaks per-record privacy
    accounting.

    NOTE: the one-hot categories and the standardisation mean and variance are computed
    from the training records without privacy. A private model trained on these features
    is private with respect to its training updates, not to this preprocessing.

    Args:
        data_dir: Root data directory; ``None`` uses ``$ZOO_DATA_DIR`` or ``~/.cache/zoo/data``.
        batch_size: Examples per batch, or -1 for full-batch mode.
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of ``adult.data`` held out for validation, in ``[0, 1)``.
        seed: Seed of the train/validation split and of the training shuffle.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}.")
        if batch_size == 0 or batch_size < -1:
            raise ValueError(
                f"batch_size must be a positive int or -1 (full batch), got {batch_size}."
            )
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("seed", seed, minimum=0)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise TypeError(f"val_fraction must be a float, got {val_fraction!r}.")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1), got {val_fraction}; for example use 0.1."
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.seed = seed
        #: Column names of the encoded features, ``"workclass=Private"`` or ``"age"``.
        self.feature_names: list[str] = []
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def folder(self) -> Path:
        """Folder that must contain ``adult.data`` and ``adult.test``."""
        return resolve_data_dir(self.data_dir) / "adult" / "uci"

    @property
    def num_features(self) -> int:
        """Width of a feature vector after encoding (calls :meth:`setup` if needed)."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return int(self.train_set.tensors[0].shape[1])

    @property
    def full_batch(self) -> bool:
        """Whether every loader yields its whole split as one batch."""
        return self.batch_size == -1

    def prepare_data(self) -> None:
        """Check that both files exist; the data is not downloaded automatically."""
        missing = [name for name in FILES if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"UCI Adult files {missing} not found in {self.folder}. Download adult.data "
                f"and adult.test from {SOURCE_URL} into that folder, or pass data_dir (or "
                f"set ${DATA_DIR_ENV}) to a folder that contains adult/uci/."
            )

    def setup(self, stage: str | None = None) -> None:
        """Parse both files, split train/validation and fit the encoding on train only."""
        if self.train_set is not None:
            return
        self.prepare_data()
        raw_data, labels_data = read_adult_file(self.folder / "adult.data")
        raw_test, labels_test = read_adult_file(self.folder / "adult.test")

        generator = np.random.default_rng(self.seed)
        order = generator.permutation(len(labels_data))
        num_val = int(round(self.val_fraction * len(order)))
        val_index, train_index = order[:num_val], order[num_val:]
        train_index = self._trim_for_processes(train_index)

        preprocessor = build_preprocessor()
        train_x = preprocessor.fit_transform(_numeric_to_float(raw_data[train_index]))
        categories = preprocessor.named_transformers_["categorical"].categories_
        self.feature_names = [
            f"{name}={value}"
            for name, values in zip(CATEGORICAL_COLUMNS, categories, strict=True)
            for value in values
        ] + list(NUMERIC_COLUMNS)

        def encode(raw: np.ndarray) -> torch.Tensor:
            if len(raw) == 0:
                return torch.zeros(0, train_x.shape[1])
            features = preprocessor.transform(_numeric_to_float(raw))
            return torch.from_numpy(np.nan_to_num(features, nan=0.0).astype(np.float32))

        self.train_set = TensorDataset(
            torch.from_numpy(np.nan_to_num(train_x, nan=0.0).astype(np.float32)),
            torch.from_numpy(labels_data[train_index]),
        )
        self.val_set = TensorDataset(
            encode(raw_data[val_index]), torch.from_numpy(labels_data[val_index])
        )
        self.test_set = TensorDataset(encode(raw_test), torch.from_numpy(labels_test))
        logger.info(
            "Adult: %d train, %d validation, %d test records, %d features",
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
            self.num_features,
        )

    def _trim_for_processes(self, train_index: np.ndarray) -> np.ndarray:
        trainer = getattr(self, "trainer", None)
        world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        extra = len(train_index) % world_size
        if not self.full_batch or extra == 0:
            return train_index
        logger.info(
            "Adult full-batch mode: dropping %d of %d training records so that %d processes "
            "get equal, disjoint shards",
            extra,
            len(train_index),
            world_size,
        )
        return train_index[: len(train_index) - extra]

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole training split as ``(features, labels)`` tensors."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        features, labels = self.train_set.tensors
        return features, labels

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "setup() builds every split"
        if self.full_batch:
            return DataLoader(
                FullBatchTensorDataset(*dataset.tensors),
                batch_size=max(len(dataset), 1),
                shuffle=False,
                collate_fn=first_item,
            )
        return seeded_loader(
            dataset,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Return the training loader: seeded shuffled batches, or one full batch."""
        self.setup("fit")
        assert self.train_set is not None
        # setup() may have run before a multi-process trainer was attached, so trim again.
        kept = self._trim_for_processes(np.arange(len(self.train_set)))
        if len(kept) < len(self.train_set):
            self.train_set = TensorDataset(*(t[: len(kept)] for t in self.train_set.tensors))
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader, in a fixed order."""
        self.setup("fit")
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Return the test loader (``adult.test``), in a fixed order."""
        self.setup("test")
        return self._loader(self.test_set, shuffle=False)
