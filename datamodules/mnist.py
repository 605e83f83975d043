"""MNIST from the four original IDX files, with checksummed download and a seeded split."""

from __future__ import annotations

import functools
import gzip
import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from zoo.datamodules.paths import DATA_DIR_ENV, download_with_checksum, resolve_data_dir
from zoo.datamodules.splits import SplitLoaders

logger = logging.getLogger(__name__)

#: Mirror that torchvision's MNIST dataset also downloads from (one of ``MNIST.mirrors``).
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
#: Environment variable that overrides the download mirror (a base URL ending in ``/``).
MIRROR_ENV = "ZOO_MNIST_MIRROR"

#: SHA-256 of the original gzip files as LeCun, Cortes and Burges distributed them.
FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

#: Mean and standard deviation of the training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip-compressed IDX file (unsigned-byte data) into a numpy array.

    Raises:
        ValueError: if the header's magic number is not an unsigned-byte image or label file,
            or the payload size does not match the dimensions in the header.
    """
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic not in (_IMAGE_MAGIC, _LABEL_MAGIC):
        raise ValueError(
            f"{path} is not an MNIST IDX file: magic number {magic}, expected "
            f"{_IMAGE_MAGIC} (images) or {_LABEL_MAGIC} (labels). Delete it and download again."
        )
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header gives shape {shape} ({expected} bytes), "
            f"file has {len(data) - offset} bytes of data. Delete it and download again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=4)
def _read_split(
    folder: Path, prefix: str, modified: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    # Decompressing the 47 MB of training images takes seconds, so repeated set-ups in
    # one process (tests, sweeps) reuse the arrays. The files' modification times are part
    # of the key, so a re-downloaded file is read again.
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def load_mnist_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split as normalised float images ``[N, 1, 28, 28]`` and int64 labels."""
    prefix = "train" if train else "t10k"
    modified = tuple(
        (folder / f"{prefix}-{kind}-ubyte.gz").stat().st_mtime_ns
        for kind in ("images-idx3", "labels-idx1")
    )
    images, labels = _read_split(folder, prefix, modified)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {prefix} split in {folder} has {images.shape[0]} images but "
            f"{labels.shape[0]} labels; the files do not belong together."
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


class MNISTDataModule(SplitLoaders, pl.LightningDataModule):
    """MNIST handwritten digits: 60,000 training and 10,000 test images, 28 x 28 grey.

    Reads the four original IDX ``.gz`` files from ``<data_dir>/mnist/``. When a file is
    missing and ``download`` is true, it is fetched from ``mirror`` and checked against the
    published SHA-256. The training set is split into train and validation parts with a
    seeded permutation, so runs with the same ``seed`` see the same split and order.

    Batches are ``(image, label)`` with ``image`` a float tensor ``[B, 1, 28, 28]``
    normalised by the training mean and standard deviation and ``label`` an int64 tensor.

    Args:
        data_dir: Root data directory; ``None`` uses ``$ZOO_DATA_DIR`` or ``~/.cache/zoo/data``.
        batch_size: Examples per batch for every loader.
        num_workers: DataLoader worker processes.
        val_size: Training images held out for validation (taken before ``subset``).
        seed: Seed of the train/validation split and of the training shuffle.
        download: Download missing files from the mirror; if false, missing files raise.
        subset: If set, use only this many training examples (the first of the seeded
            permutation) and at most this many validation and test examples, for quick runs.
        mirror: Base URL that contains the four ``.gz`` files; ``None`` uses ``$ZOO_MNIST_MIRROR``
            or the mirror torchvision uses.
    """

    dataset_name = "MNIST"

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = True,
        subset: int | None = None,
        mirror: str | None = None,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("val_size", val_size, minimum=0)
        if val_size >= 60000:
            raise ValueError(
                f"val_size={val_size} leaves no training data: MNIST has 60000 training "
                "images. Use a value below 60000, for example 5000."
            )
        _check_int("seed", seed, minimum=0)
        if subset is not None:
            _check_int("subset", subset, minimum=1)
        if not isinstance(download, bool):
            raise TypeError(f"download must be a bool, got {download!r}.")
        if mirror is not None and not isinstance(mirror, str):
            raise TypeError(f"mirror must be a URL string or None, got {mirror!r}.")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.download = download
        self.subset = subset
        self.mirror = mirror
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def folder(self) -> Path:
        """Folder that contains (or will contain) the four IDX files."""
        return resolve_data_dir(self.data_dir) / "mnist"

    def resolved_mirror(self) -> str:
        """Return the base URL to download from: the argument, the env variable, or the default."""
        mirror = self.mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
        return mirror if mirror.endswith("/") else mirror + "/"

    def prepare_data(self) -> None:
        """Download missing or corrupt files, or raise if files are missing and download is off.

        Lightning calls this on one process per node, before ``setup``.
        """
        folder = self.folder
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing and not self.download:
            raise FileNotFoundError(
                f"MNIST files {missing} not found in {folder}. Pass download=True to fetch them "
                f"from {self.resolved_mirror()}, or point data_dir (or ${DATA_DIR_ENV}) at a "
                "folder whose mnist/ subfolder holds the four original IDX .gz files."
            )
        if not self.download:
            return
        for name, sha256 in FILES.items():
            # Skips files whose checksum already matches and replaces corrupt ones.
            download_with_checksum(self.resolved_mirror() + name, folder / name, sha256)

    def setup(self, stage: str | None = None) -> None:
        """Load the files and build the seeded train/validation split and the test set."""
        folder = self.folder
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"MNIST files {missing} not found in {folder}. Run prepare_data() with "
                f"download=True, or point data_dir (or ${DATA_DIR_ENV}) at a folder whose mnist/ "
                "subfolder holds the four original IDX .gz files."
            )
        if self.train_set is None:
            x, y = load_mnist_split(folder, train=True)
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(y), generator=generator)
            val_index = order[: self.val_size]
            train_index = order[self.val_size :]
            if self.subset is not None:
                train_index = train_index[: self.subset]
                val_index = val_index[: self.subset]
            full = TensorDataset(x, y)
            self.train_set = Subset(full, train_index.tolist())
            self.val_set = Subset(full, val_index.tolist())
        if self.test_set is None:
            x_test, y_test = load_mnist_split(folder, train=False)
            if self.subset is not None:
                x_test, y_test = x_test[: self.subset], y_test[: self.subset]
            self.test_set = TensorDataset(x_test, y_test)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
