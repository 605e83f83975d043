"""Tests of the shared callbacks and of the data-directory and download helpers."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import pytest
from lightning.pytorch.loggers import CSVLogger
from toy_models import IrisClassifier, IrisDataModule

from zoo.callbacks.figures import log_figure
from zoo.callbacks.progress import LineProgress
from zoo.datamodules.paths import download_with_checksum, resolve_data_dir

matplotlib.use("Agg")


class _FigureEveryEpoch(pl.Callback):
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots()
        axes.plot([0, 1], [0, trainer.current_epoch])
        log_figure(trainer, "val/curve", figure)


def test_figures_and_line_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[_FigureEveryEpoch(), LineProgress(every_n_percent=50)],
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(IrisClassifier(), datamodule=IrisDataModule())
    figures = sorted((Path(trainer.logger.log_dir) / "figures").glob("val_curve-step*.png"))
    assert [path.name for path in figures] == ["val_curve-step14.png", "val_curve-step7.png"]
    assert figures[0].read_bytes()[:4] == b"\x89PNG"
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("epoch 1 4/7 batches") for line in lines), lines
    assert any(line.startswith("epoch 1 done") and "val_acc=" in line for line in lines), lines


def test_line_progress_rejects_bad_spacing() -> None:
    with pytest.raises(ValueError, match="got 0"):
        LineProgress(every_n_percent=0)


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("ZOO_DATA_DIR")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "zoo" / "data"


@pytest.fixture
def loopback_server(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256(loopback_server, tmp_path: Path) -> None:
    served, base_url = loopback_server
    content = b"real bytes" * 100
    (served / "file.bin").write_bytes(content)
    good = hashlib.sha256(content).hexdigest()
    dest = tmp_path / "data" / "file.bin"

    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        download_with_checksum(f"{base_url}/file.bin", dest, "0" * 64)
    assert not dest.exists()
    assert not list(dest.parent.glob("*.part"))

    assert download_with_checksum(f"{base_url}/file.bin", dest, good).read_bytes() == content
    (served / "file.bin").unlink()
    # A verified file already in place is not downloaded again.
    assert download_with_checksum(f"{base_url}/file.bin", dest, good) == dest
    with pytest.raises(RuntimeError, match="place the file"):
        download_with_checksum(f"{base_url}/missing.bin", tmp_path / "other.bin", good)
