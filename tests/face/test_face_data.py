"""Face datamodule: identity split, bad input, the Olivetti fallback and .bin pair files."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.face.image_folders as image_folders
from zoo.datamodules.faces import EpochSeededSampler, FaceDataModule
from zoo.face.bin_pairs import read_verification_bin


def _write_image(path: Path, seed: int, size=(20, 24), mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


def _make_tree(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for identity, count in counts.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            mode = "RGB" if index % 2 else "L"
            _write_image(
                root / identity / f"{index}{suffix}", hash((identity, index)) % 1000, mode=mode
            )
    return root


def _datamodule(root: Path, **kwargs) -> FaceDataModule:
    options = {"root": str(root), "num_val_identities": 2, "image_size": 16, "batch_size": 2}
    options.update(kwargs)
    return FaceDataModule(**options)


def test_split_by_identity_in_natural_order(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {f"s{k}": 3 for k in range(1, 12)})
    datamodule = _datamodule(root, num_val_identities=3)
    datamodule.setup("fit")
    assert datamodule.train_identities == [f"s{k}" for k in range(1, 9)]
    assert datamodule.num_classes == 8
    assert {name.split("/")[0] for name in datamodule.val_names} == {"s9", "s10", "s11"}
    images, labels, index = datamodule.train_set[0]
    assert images.shape == (1, 16, 16)
    assert float(images.min()) >= -1.0
    assert float(images.max()) <= 1.0
    pairs = datamodule.verification_pairs
    assert int(pairs[:, 2].sum()) == 3 * 3  # three genuine pairs per identity
    assert int((1 - pairs[:, 2]).sum()) == 9


def test_resize_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _make_tree(tmp_path / "faces", {f"s{k}": 2 for k in range(1, 5)})
    with caplog.at_level(logging.INFO):
        _datamodule(root, channels=3).setup("fit")
    resize_lines = [r for r in caplog.records if "Resizing" in r.getMessage()]
    assert len(resize_lines) == 1
    assert "16x16" in resize_lines[0].getMessage()


def test_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        _datamodule(tmp_path / "absent").setup("fit")
    (tmp_path / "empty" / "s1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no identity sub-folders"):
        _datamodule(tmp_path / "empty").setup("fit")


def test_unreadable_files_skipped_and_counted(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {f"s{k}": 3 for k in range(1, 6)})
    (root / "s1" / "notes.txt").write_text("not an image")
    (root / "s2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    datamodule = _datamodule(root)
    with pytest.warns(UserWarning) as records:
        datamodule.setup("fit")
    messages = [str(r.message) for r in records]
    assert any("notes.txt" in m for m in messages)
    assert any("broken.png" in m for m in messages)
    assert any("Skipped 2 unreadable" in m for m in messages)
    assert len(datamodule.train_set) == 9


def test_single_image_identity_kept_out_of_genuine_pairs(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {"a": 3, "b": 3, "c": 3, "d": 1})
    datamodule = _datamodule(root, num_val_identities=2)
    with pytest.warns(UserWarning, match=r"\['d'\] have one image"):
        datamodule.setup("fit")
    names = datamodule.val_names
    lonely = names.index("d/0.png")
    pairs = datamodule.verification_pairs
    genuine = pairs[pairs[:, 2] == 1]
    assert not (genuine[:, :2] == lonely).any()
    assert len(genuine) == 3


def test_identity_without_readable_image(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {"a": 2, "b": 2, "c": 2})
    (root / "d").mkdir()
    (root / "d" / "x.txt").write_text("text")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"\['d'\].*no readable image"):
        _datamodule(root, num_val_identities=1).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels must be 1"),
        ({"image_size": [16]}, "image_size must be"),
        ({"batch_size": 1}, "batch_size must be"),
        ({"num_val_identities": 0}, "needs a val_bin"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _datamodule(tmp_path, **kwargs)


def test_batch_larger_than_training_set(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(ValueError, match="batch_size=8 exceeds the 4 training images"):
        _datamodule(root, num_val_identities=1, batch_size=8).setup("fit")
    with pytest.raises(ValueError, match="leaves no training identity"):
        _datamodule(root, num_val_identities=3).setup("fit")


def test_olivetti_fallback_writes_identity_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_fetch(data_home: Path):
        calls.append(data_home)
        rng = np.random.default_rng(0)
        return rng.random((12, 64, 64), dtype=np.float32), np.repeat(np.arange(4), 3)

    monkeypatch.setattr(image_folders, "_fetch_olivetti_faces", fake_fetch)
    datamodule = FaceDataModule(data_dir=str(tmp_path), num_val_identities=1, batch_size=2)
    datamodule.prepare_data()
    datamodule.prepare_data()  # the second call finds the folders and does not fetch
    datamodule.setup("fit")
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "faces" / "olivetti").iterdir()) == [
        "s1",
        "s2",
        "s3",
        "s4",
    ]
    assert datamodule.resolve_root() == tmp_path / "faces" / "olivetti"
    assert datamodule.val_names == ["s4/1.png", "s4/2.png", "s4/3.png"]
    offline = FaceDataModule(data_dir=str(tmp_path / "other"), download=False)
    with pytest.raises(FileNotFoundError, match="faces/orl"):
        offline.setup("fit")


def test_failed_olivetti_download_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    def offline_fetch(data_home: Path):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(image_folders, "_fetch_olivetti_faces", offline_fetch)
    datamodule = FaceDataModule(data_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert str(tmp_path / "faces" / "orl") in message
    assert "Name or service not known" in message
    assert "--data.init_args.root" in message
    assert not (tmp_path / "faces" / "olivetti").exists()


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_tree(tmp_path / "faces" / "orl", {f"s{k}": 2 for k in range(1, 5)})
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    datamodule = FaceDataModule(num_val_identities=1, image_size=16, batch_size=2)
    assert datamodule.resolve_root() == tmp_path / "faces" / "orl"


def test_sampler_depends_on_seed_and_epoch() -> None:
    sampler = EpochSeededSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def _encoded_png(seed: int, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("as_array", [True, False])
def test_read_verification_bin(tmp_path: Path, protocol: int, as_array: bool) -> None:
    flags = [True, False, True]
    issame = np.array(flags) if as_array else flags
    path = tmp_path / "pairs.bin"
    path.write_bytes(pickle.dumps(([_encoded_png(i) for i in range(6)], issame), protocol))
    images, is_same = read_verification_bin(path, image_size=(16, 16), channels=1)
    assert images.shape == (6, 1, 16, 16)
    assert images.dtype == torch.uint8
    assert is_same.tolist() == flags
    original, _ = read_verification_bin(path, channels=3)
    assert original.shape == (6, 3, 10, 12)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_read_verification_bin_rejects_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit()], [True])))
    with pytest.raises(pickle.UnpicklingError, match="Rejected the global .*system"):
        read_verification_bin(path)
    object_array = tmp_path / "objects.bin"
    object_array.write_bytes(pickle.dumps(([], np.array([True], dtype=object))))
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        read_verification_bin(object_array)
    with pytest.raises(FileNotFoundError, match="lfw.bin"):
        read_verification_bin(tmp_path / "missing.bin")


def test_datamodule_with_val_bin(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {f"s{k}": 2 for k in range(1, 4)})
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([_encoded_png(i) for i in range(4)], [False, True])))
    datamodule = _datamodule(root, num_val_identities=0, val_bin=str(path))
    datamodule.setup("fit")
    assert datamodule.num_classes == 3
    assert len(datamodule.val_set) == 4
    assert datamodule.verification_pairs.tolist() == [[0, 1, 0], [2, 3, 1]]


def test_num_identities_ignores_later_identities(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", {f"s{k}": 3 for k in range(1, 9)})
    datamodule = _datamodule(root, num_identities=6, num_val_identities=2)
    datamodule.setup("fit")
    assert datamodule.train_identities == ["s1", "s2", "s3", "s4"]
    assert {name.split("/")[0] for name in datamodule.val_names} == {"s5", "s6"}
    with pytest.raises(ValueError, match="num_identities must be None or an integer >= 2"):
        _datamodule(root, num_identities=1)


def _attach_trainer(datamodule: FaceDataModule, **trainer_kwargs) -> None:
    import lightning.pytorch as pl

    options = {"enable_progress_bar": False, "enable_model_summary": False}
    options.update(trainer_kwargs)
    datamodule.trainer = pl.Trainer(**options)


def test_pairs_not_written_to_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _make_tree(tmp_path / "faces", {"a": 3, "b": 3, "c": 3})
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    datamodule = _datamodule(root, num_val_identities=1)
    # A Trainer without logger, checkpointing or default_root_dir writes no run folder.
    _attach_trainer(datamodule, logger=False, enable_checkpointing=False)
    datamodule.setup("fit")
    assert datamodule.pairs_folder() is None
    assert list(workdir.iterdir()) == []


def test_pairs_written_to_run_folder(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    root = _make_tree(tmp_path / "faces", {"a": 3, "b": 3, "c": 3})
    logged = _datamodule(root, num_val_identities=1)
    _attach_trainer(logged, logger=CSVLogger(tmp_path / "logs", name="run"))
    logged.setup("fit")
    log_file = tmp_path / "logs" / "run" / "version_0" / "verification_pairs.csv"
    assert log_file.is_file()
    assert log_file.read_text().splitlines()[1] == "c/0.png,c/1.png,1"

    unlogged = _datamodule(root, num_val_identities=1)
    _attach_trainer(unlogged, logger=False, default_root_dir=tmp_path / "run")
    unlogged.setup("fit")
    assert (tmp_path / "run" / "verification_pairs.csv").is_file()
