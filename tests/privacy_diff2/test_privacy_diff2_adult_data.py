"""Tests of the UCI Adult datamodule: parsing, encoding, splits and input validation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from zoo.datamodules.adult import AdultDataModule, read_adult_file

TRAIN_LINES = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, "
    "Male, 2174, 0, 40, United-States, <=50K",
    "50, ?, 83311, Bachelors, 13, Married-civ-spouse, ?, Husband, White, Male, 0, 0, 13, "
    "United-States, >50K",
    "38, Private, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, White, Male, "
    "0, 0, 40, ?, <=50K",
    "53, Private, 234721, 11th, 7, Married-civ-spouse, Handlers-cleaners, Husband, Black, Male, "
    "0, 0, 40, United-States, >50K",
]
TEST_LINES = [
    "|1x3 Cross validator",
    "25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Male, "
    "0, 0, 40, Peru, <=50K.",
    "44, Private, 160323, Some-college, 10, Married-civ-spouse, Machine-op-inspct, Husband, "
    "Black, Male, 7688, 0, 40, United-States, >50K.",
]


def write_tiny_adult(root: Path) -> Path:
    folder = root / "adult" / "uci"
    folder.mkdir(parents=True)
    (folder / "adult.data").write_text("\n".join(TRAIN_LINES) + "\n\n")
    (folder / "adult.test").write_text("\n".join(TEST_LINES) + "\n\n")
    return folder


def test_read_adult_file_labels_and_missing(tmp_path: Path) -> None:
    folder = write_tiny_adult(tmp_path)
    raw, labels = read_adult_file(folder / "adult.data")
    assert raw.shape == (4, 14)
    assert labels.tolist() == [0, 1, 0, 1]
    assert raw[1, 1] == "?"
    raw_test, labels_test = read_adult_file(folder / "adult.test")
    assert raw_test.shape == (2, 14), "the comment line and the blank line are skipped"
    assert labels_test.tolist() == [0, 1], "the trailing '.' of test labels is stripped"


def test_read_adult_file_rejects_bad_label(tmp_path: Path) -> None:
    path = tmp_path / "adult.data"
    path.write_text(TRAIN_LINES[0].replace("<=50K", "maybe") + "\n")
    with pytest.raises(ValueError, match="maybe"):
        read_adult_file(path)


def test_encoding_fitted_on_train_only(tmp_path: Path) -> None:
    write_tiny_adult(tmp_path)
    module = AdultDataModule(data_dir=str(tmp_path), val_fraction=0.0)
    module.setup()
    features = module.train_set.tensors[0]
    assert module.feature_names.count("workclass=?") == 1, "'?' is a category of its own"
    age = module.feature_names.index("age")
    assert torch.allclose(features[:, age].mean(), torch.tensor(0.0), atol=1e-6)
    # Peru never occurs in training, so it encodes as all zeros in native-country.
    test_features = module.test_set.tensors[0]
    country = [i for i, name in enumerate(module.feature_names) if name.startswith("native-")]
    assert test_features[0, country].sum().item() == 0.0
    assert test_features[1, country].sum().item() == 1.0
    # The test record's age (25) is standardised with the training mean (45) and std.
    train_ages = np.array([39.0, 50.0, 38.0, 53.0])
    expected = (25.0 - train_ages.mean()) / train_ages.std()
    assert test_features[0, age].item() == pytest.approx(expected, rel=1e-5)


def test_missing_files_raise_with_location(tmp_path: Path) -> None:
    module = AdultDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        module.setup()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_size": 0}, ValueError),
        ({"batch_size": -2}, ValueError),
        ({"batch_size": 1.5}, TypeError),
        ({"val_fraction": 1.0}, ValueError),
        ({"num_workers": -1}, ValueError),
        ({"seed": "zero"}, TypeError),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, error: type) -> None:
    with pytest.raises(error, match=str(next(iter(kwargs.values())))):
        AdultDataModule(**kwargs)


def test_real_adult_counts_and_full_batch(shared_data: Path) -> None:
    module = AdultDataModule(data_dir=str(shared_data), batch_size=-1, val_fraction=0.1)
    module.setup()
    assert len(module.train_set) + len(module.val_set) == 32561
    assert len(module.test_set) == 16281
    assert module.num_features == len(module.feature_names)
    positives = module.train_set.tensors[1].sum() + module.val_set.tensors[1].sum()
    assert positives.item() == 7841
    assert module.test_set.tensors[1].sum().item() == 3846
    batches = list(module.train_dataloader())
    assert len(batches) == 1
    assert batches[0][0].shape == (len(module.train_set), module.num_features)


def test_full_batch_trims_to_world_size(shared_data: Path) -> None:
    module = AdultDataModule(data_dir=str(shared_data), batch_size=-1, val_fraction=0.1)
    module.trainer = SimpleNamespace(world_size=4)
    module.setup()
    assert len(module.train_set) % 4 == 0
    assert 32561 - 3256 - len(module.train_set) < 4


def test_full_batch_shards_are_disjoint(shared_data: Path) -> None:
    module = AdultDataModule(data_dir=str(shared_data), batch_size=-1)
    module.trainer = SimpleNamespace(world_size=2)
    module.setup()
    loader = module.train_dataloader()
    features, labels = module.train_tensors()
    for rank in range(2):
        # Lightning rebuilds the loader like this when it inserts its distributed sampler.
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        sharded = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            collate_fn=loader.collate_fn,
        )
        batches = list(sharded)
        assert len(batches) == 1
        assert torch.equal(batches[0][0], features[rank::2])
        assert torch.equal(batches[0][1], labels[rank::2])


def test_trainer_attached_after_setup_trims(shared_data: Path) -> None:
    module = AdultDataModule(data_dir=str(shared_data), batch_size=-1, val_fraction=0.1)
    module.setup()
    assert len(module.train_set) % 2 == 1, "32561 - 3256 = 29305 records before trimming"
    module.trainer = SimpleNamespace(world_size=2)
    loader = module.train_dataloader()
    assert len(loader.dataset) == 29304
    assert len(module.train_tensors()[0]) == 29304
