"""Digits and mocap datamodules: split sizes, determinism, loading and input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoo.datamodules.digits import DigitsDataModule
from zoo.datamodules.mocap import MocapDataModule, cut_windows, observation_masks


def test_digits_split_sizes_and_disjoint() -> None:
    data = DigitsDataModule(val_size=300, test_size=200, seed=3)
    data.setup()
    assert len(data.train_set) == 1797 - 500
    assert len(data.val_set) == 300
    assert len(data.test_set) == 200
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (64, 1, 8, 8)
    assert labels.dtype == torch.int64
    train_images = data.train_set.tensors[0]
    assert train_images.mean().abs().item() < 1e-4
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_split_repeats_with_seed() -> None:
    first, second, other = (DigitsDataModule(seed=seed) for seed in (0, 0, 1))
    for data in (first, second, other):
        data.setup()
    assert torch.equal(first.test_set.tensors[1], second.test_set.tensors[1])
    assert not torch.equal(first.test_set.tensors[0], other.test_set.tensors[0])


def test_digits_rejects_oversized_holdout() -> None:
    with pytest.raises(ValueError, match="val_size=1000 plus test_size=900"):
        DigitsDataModule(val_size=1000, test_size=900)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        DigitsDataModule(batch_size=1.5)


def test_cut_windows_and_masks() -> None:
    sequences = torch.arange(2 * 10 * 1, dtype=torch.float32).reshape(2, 10, 1).numpy()
    windows = cut_windows(sequences, length=4, stride=3)
    assert windows.shape == (2 * 3, 4, 1)
    assert windows[1, 0, 0] == 3.0
    assert windows[3, 0, 0] == 10.0
    mask = observation_masks(5, 8, 3, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 8)
    assert mask.sum(dim=1).tolist() == [3] * 5


def test_mocap_loads_shipped_split(shared_data: Path) -> None:
    data = MocapDataModule(data_dir=str(shared_data), seq_len=50, stride=10, download=False)
    data.setup()
    # 16 / 3 / 4 sequences of 300 frames: 26 overlapping training windows per sequence,
    # 6 disjoint windows per validation and test sequence.
    assert len(data.datasets["train"]) == 16 * 26
    assert len(data.datasets["val"]) == 3 * 6
    assert len(data.datasets["test"]) == 4 * 6
    values, mask, times = next(iter(data.train_dataloader()))
    assert values.shape == (32, 50, 50)
    assert mask.sum(dim=1).tolist() == [25] * 32
    assert torch.allclose(times[0], torch.arange(50) * 0.02)
    train_values = data.datasets["train"].tensors[0]
    assert train_values.mean(dim=(0, 1)).abs().max().item() < 0.2
    test_values = data.datasets["test"].tensors[0]
    assert test_values.abs().max().item() < 50.0


def test_mocap_masks_repeat_with_seed(shared_data: Path) -> None:
    first = MocapDataModule(data_dir=str(shared_data), download=False, seed=5)
    second = MocapDataModule(data_dir=str(shared_data), download=False, seed=5)
    first.setup()
    second.setup()
    assert torch.equal(first.datasets["test"].tensors[1], second.datasets["test"].tensors[1])


def test_mocap_missing_file_names_path(tmp_path: Path) -> None:
    data = MocapDataModule(data_dir=str(tmp_path), download=False)
    data.prepare_data()
    with pytest.raises(FileNotFoundError, match="mocap35.mat"):
        data.setup()


def test_mocap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="observed_fraction=0"):
        MocapDataModule(observed_fraction=0)
    with pytest.raises(ValueError, match="time_step=-1"):
        MocapDataModule(time_step=-1.0)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        MocapDataModule(seq_len=1)


@pytest.fixture
def loopback_server(tmp_path: Path):
    """Serve ``tmp_path / "served"`` over HTTP on 127.0.0.1; yield (folder, base URL)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_mocap_downloads_from_loopback(shared_data: Path, tmp_path: Path, loopback_server) -> None:
    import shutil

    folder, base_url = loopback_server
    shutil.copy(shared_data / "timeseries" / "mocap_cmu_walking" / "mocap35.mat", folder)
    data = MocapDataModule(data_dir=str(tmp_path / "cache"), url=f"{base_url}/mocap35.mat")
    data.prepare_data()
    data.setup()
    assert (tmp_path / "cache" / "timeseries" / "mocap_cmu_walking" / "mocap35.mat").is_file()
    assert len(data.datasets["test"]) == 24


def test_mocap_download_rejects_wrong_checksum(tmp_path: Path, loopback_server) -> None:
    folder, base_url = loopback_server
    (folder / "mocap35.mat").write_bytes(b"not the mocap file")
    data = MocapDataModule(data_dir=str(tmp_path / "cache"), url=f"{base_url}/mocap35.mat")
    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        data.prepare_data()
    assert not (tmp_path / "cache" / "timeseries" / "mocap_cmu_walking" / "mocap35.mat").exists()
