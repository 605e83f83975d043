"""CMU motion-capture walking sequences (subject 35) as irregularly sampled time series.

The file ``mocap35.mat`` is the preprocessed subject-35 walking set of Yildiz, Heinonen and
Lähdesmäki, "ODE2VAE: Deep generative second order ODEs with Bayesian neural networks"
(NeurIPS 2019), built from the CMU Graphics Lab Motion Capture Database. It contains 23
sequences of 300 frames x 50 features, already split into 16 training (``Xtr``), 3
validation (``Xval``) and 4 test (``Xtest``) sequences; that split is kept here.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.datamodules.paths import DATA_DIR_ENV, download_with_checksum, resolve_data_dir
from zoo.datamodules.sampling import seeded_loader

logger = logging.getLogger(__name__)

RELATIVE_PATH = Path("timeseries") / "mocap_cmu_walking" / "mocap35.mat"
SHA256 = "105484f138487f10209cce883d26e2e030d10a6df6f10159f4e6e253f9b03b8d"
# NOTE: this mirror is a copy in the Apache-2.0 repository uncbiag/neuro_shooting at a pinned
# commit. It could not be reached from the development machines, so only the checksum is known.
DEFAULT_URL = (
    "https://raw.githubusercontent.com/uncbiag/neuro_shooting/"
    "ebf80a9c0a4515fdfffaa0c5418dc866e2776495/data/mocap/mocap35.mat"
)
SPLIT_KEYS = {"train": "Xtr", "val": "Xval", "test": "Xtest"}


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def load_mocap_splits(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``mocap35.mat`` and return its splits ``{"train", "val", "test"}``.

    Each split is a float32 array ``[sequences, frames, features]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file lacks one of the arrays ``Xtr``, ``Xval``, ``Xtest``.
    """
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Motion-capture file {path} not found.")
    contents = loadmat(path)
    missing = [key for key in SPLIT_KEYS.values() if key not in contents]
    if missing:
        raise ValueError(
            f"{path} lacks the arrays {missing}; expected the ODE2VAE file mocap35.mat with "
            f"Xtr, Xval and Xtest (sha256 {SHA256})."
        )
    return {split: np.asarray(contents[key], dtype=np.float32) for split, key in SPLIT_KEYS.items()}


def cut_windows(sequences: np.ndarray, length: int, stride: int) -> np.ndarray:
    """Cut ``[sequences, frames, features]`` into windows ``[windows, length, features]``."""
    frames = sequences.shape[1]
    if length > frames:
        raise ValueError(f"seq_len={length} is longer than the sequences ({frames} frames).")
    starts = range(0, frames - length + 1, stride)
    return np.stack(
        [sequence[start : start + length] for sequence in sequences for start in starts]
    )


def observation_masks(
    windows: int, length: int, observed: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw which frames of each window are observed: ``observed`` distinct frames each."""
    scores = torch.rand(windows, length, generator=generator)
    chosen = scores.argsort(dim=1)[:, :observed]
    mask = torch.zeros(windows, length, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask


class MocapDataModule(pl.LightningDataModule):
    """Irregularly sampled windows of the CMU walking sequences (ODE2VAE split).

    Every sequence is cut into windows of ``seq_len`` frames (every ``stride`` frames for
    training, without overlap for validation and test). Features are standardized with the
    training mean and standard deviation (features that are constant in training are
    only centered). In each window a random subset of
    ``observed_fraction`` of the frames is marked observed, drawn once from ``seed``, so the
    model sees an irregular sample and is scored on all frames.

    Batches are ``(values, mask, times)``: ``values`` float ``[B, seq_len, 50]``, ``mask``
    bool ``[B, seq_len]`` (true where observed) and ``times`` float ``[B, seq_len]``, the
    frame times ``0, time_step, 2 * time_step, ...`` shared by every window.

    Args:
        data_dir: Root data directory; the file is ``<data_dir>/timeseries/mocap_cmu_walking/
            mocap35.mat``. ``None`` uses ``$ZOO_DATA_DIR`` or ``~/.cache/zoo/data``.
        batch_size: Windows per batch.
        seq_len: Frames per window.
        stride: Distance in frames between the starts of training windows.
        observed_fraction: Share of frames per window that are observed, in (0, 1].
        time_step: Time between consecutive frames in the model's time units.
        seed: Seed of the observation masks and of the training shuffle.
        download: Download the file when it is missing.
        url: Where to download from; ``None`` uses a pinned public copy.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 32,
        seq_len: int = 50,
        stride: int = 10,
        observed_fraction: float = 0.5,
        time_step: float = 0.02,
        seed: int = 0,
        download: bool = True,
        url: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("seq_len", seq_len, minimum=2)
        _check_int("stride", stride, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        if not isinstance(observed_fraction, (int, float)) or not 0 < observed_fraction <= 1:
            raise ValueError(
                f"observed_fraction={observed_fraction!r} is invalid; use a number in (0, 1]."
            )
        if (
            not isinstance(time_step, (int, float))
            or not math.isfinite(time_step)
            or time_step <= 0
        ):
            raise ValueError(f"time_step={time_step!r} is invalid; use a finite number > 0.")
        if not isinstance(download, bool):
            raise TypeError(f"download must be a bool, got {download!r}.")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.stride = stride
        self.observed = max(2, round(observed_fraction * seq_len))
        self.time_step = float(time_step)
        self.seed = seed
        self.download = download
        self.url = url or DEFAULT_URL
        self.num_workers = num_workers
        self.datasets: dict[str, TensorDataset] = {}
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None

    @property
    def path(self) -> Path:
        """Location of ``mocap35.mat``."""
        return resolve_data_dir(self.data_dir) / RELATIVE_PATH

    def prepare_data(self) -> None:
        """Download the file when it is missing and ``download`` is true."""
        if self.path.is_file() or not self.download:
            return
        download_with_checksum(self.url, self.path, SHA256)

    def setup(self, stage: str | None = None) -> None:
        """Read the file, standardize, cut windows and draw the observation masks."""
        if self.datasets:
            return
        if not self.path.is_file():
            raise FileNotFoundError(
                f"Motion-capture file {self.path} not found. Run prepare_data() with "
                f"download=True, or point data_dir (or ${DATA_DIR_ENV}) at a folder holding "
                f"{RELATIVE_PATH} (the ODE2VAE mocap35.mat, sha256 {SHA256})."
            )
        splits = load_mocap_splits(self.path)
        train = splits["train"]
        mean = train.mean(axis=(0, 1))
        std = train.std(axis=(0, 1))
        # Four features are constant in the training split but vary slightly in the test
        # split. Dividing by their zero spread would blow them up, so they are only centered.
        std = np.where(std > 1e-3, std, 1.0).astype(np.float32)
        self.feature_mean = torch.from_numpy(mean)
        self.feature_std = torch.from_numpy(std)
        generator = torch.Generator().manual_seed(self.seed)
        times = torch.arange(self.seq_len, dtype=torch.float32) * self.time_step
        for split, sequences in splits.items():
            stride = self.stride if split == "train" else self.seq_len
            windows = cut_windows((sequences - mean) / std, self.seq_len, stride)
            values = torch.from_numpy(np.ascontiguousarray(windows))
            mask = observation_masks(len(values), self.seq_len, self.observed, generator)
            self.datasets[split] = TensorDataset(values, mask, times.expand(len(values), -1))
        logger.info(
            "Mocap windows: %s",
            {split: len(dataset) for split, dataset in self.datasets.items()},
        )

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled training loader; the shuffle order follows ``seed``."""
        return seeded_loader(
            self._require("train"),
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Return the validation windows in fixed order."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Return the test windows in fixed order."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Return the test windows for prediction."""
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._require(split),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def _require(self, split: str) -> TensorDataset:
        if split not in self.datasets:
            raise RuntimeError(f"The mocap {split} set is not loaded: call setup() first.")
        return self.datasets[split]
