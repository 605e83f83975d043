"""MNIST datamodule: parsing, seeded split, validation, and download from a loopback mirror."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from zoo.datamodules.mnist import FILES, MIRROR_ENV, MNISTDataModule


@pytest.fixture
def mirror(shared_data: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve a copy of the staged MNIST files over HTTP on 127.0.0.1 (a free port)."""
    served = tmp_path / "served"
    served.mkdir()
    for name in FILES:
        shutil.copyfile(shared_data / "mnist" / name, served / name)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mnist_download_from_mirror(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = mirror
    data_dir = tmp_path / "data"
    dm = MNISTDataModule(data_dir=str(data_dir), mirror=url, subset=100)
    dm.prepare_data()
    for name, sha256 in FILES.items():
        assert _sha256(data_dir / "mnist" / name) == sha256
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28)
    assert y.dtype == torch.int64


def test_mnist_mirror_from_env(
    mirror: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = mirror
    monkeypatch.setenv(MIRROR_ENV, url.rstrip("/"))
    dm = MNISTDataModule(data_dir=str(tmp_path / "data"))
    assert dm.resolved_mirror() == url
    dm.prepare_data()
    assert (tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_mnist_download_rejects_bad_checksum(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, served = mirror
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the MNIST labels")
    dm = MNISTDataModule(data_dir=str(tmp_path / "data"), mirror=url)
    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        dm.prepare_data()
    assert not (tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_mnist_missing_files_without_download(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        dm.setup("fit")


def test_mnist_real_data_split(shared_data: Path) -> None:
    dm = MNISTDataModule(data_dir=str(shared_data), download=False, val_size=5000)
    dm.setup("fit")
    assert len(dm.train_set) == 55000
    assert len(dm.val_set) == 5000
    assert len(dm.test_set) == 10000
    images = torch.stack([dm.train_set[i][0] for i in range(2000)])
    # Normalised by the training mean and standard deviation.
    assert abs(images.mean().item()) < 0.05
    assert abs(images.std().item() - 1.0) < 0.05
    labels = dm.test_set.tensors[1]
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_seeded_split_and_order(shared_data: Path) -> None:
    first = MNISTDataModule(data_dir=str(shared_data), download=False, subset=500, seed=3)
    second = MNISTDataModule(data_dir=str(shared_data), download=False, subset=500, seed=3)
    other = MNISTDataModule(data_dir=str(shared_data), download=False, subset=500, seed=4)
    for dm in (first, second, other):
        dm.setup("fit")
    assert first.train_set.indices == second.train_set.indices
    assert first.train_set.indices != other.train_set.indices
    batch_a = next(iter(first.train_dataloader()))[1]
    batch_b = next(iter(second.train_dataloader()))[1]
    assert torch.equal(batch_a, batch_b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int"),
        ({"val_size": 60000}, ValueError, "val_size=60000"),
        ({"subset": 0}, ValueError, "subset must be >= 1"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"download": "yes"}, TypeError, "download must be a bool"),
    ],
)
def test_mnist_rejects_invalid_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MNISTDataModule(**kwargs)
