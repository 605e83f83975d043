"""Tests of the pretrained-checkpoint hub: export, verification, loading, fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from toy_models import IrisClassifier, IrisDataModule

import zoo
from zoo import hub


@pytest.fixture
def checkpoint_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setattr(hub, "checkpoint_dir", lambda: folder)
    return folder


def _export_iris(folder: Path, name: str = "iris-test") -> IrisClassifier:
    pl.seed_everything(0)
    model = IrisClassifier(hidden=8)
    metric = {"name": "val_acc", "value": 0.5, "data": "iris", "protocol": "50 held-out rows"}
    hub.export_pretrained(
        model, name, model="iris", metric=metric, data_license="CC BY 4.0", out_dir=folder
    )
    return model


def test_export_load_roundtrip(checkpoint_folder: Path) -> None:
    original = _export_iris(checkpoint_folder)
    loaded = zoo.load_pretrained("iris-test")
    assert isinstance(loaded, IrisClassifier)
    assert loaded.hparams.hidden == 8
    assert loaded.training
    loaded.eval()
    original.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


def test_manifest_records_hash_and_metric(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    manifest = json.loads((checkpoint_folder / "iris-test.json").read_text())
    assert manifest["sha256"] == hub.sha256_file(checkpoint_folder / "iris-test.pt")
    assert len(manifest["sha256"]) == 64
    assert manifest["metric"]["data"] == "iris"
    assert manifest["config"]["init_args"]["hidden"] == 8
    assert manifest["data_license"] == "CC BY 4.0"


def test_hash_mismatch_names_file_and_hashes(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    weights = checkpoint_folder / "iris-test.pt"
    expected = hub.sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError) as error:
        zoo.load_pretrained("iris-test")
    message = str(error.value)
    assert str(weights) in message
    assert expected in message
    assert hub.sha256_file(weights) in message


def test_truncated_checkpoint_is_rejected(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    weights = checkpoint_folder / "iris-test.pt"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="failed verification"):
        zoo.load_pretrained("iris-test")
    with pytest.raises(ValueError, match="could not be read"):
        hub.load_checkpoint_file(weights)


class _Payload:
    def __reduce__(self):  # pragma: no cover - must never run
        return (exec, ("raise SystemExit('arbitrary code ran')",))


def test_pickled_objects_are_never_executed(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    weights = checkpoint_folder / "iris-test.pt"
    payload = torch.load(weights, weights_only=True)
    payload["extra"] = {"evil": _Payload()}
    torch.save(payload, weights)
    manifest_path = checkpoint_folder / "iris-test.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hub.sha256_file(weights)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="could not be read"):
        zoo.load_pretrained("iris-test")


def test_export_rejects_objects_in_hyperparameters(checkpoint_folder: Path) -> None:
    model = IrisClassifier()
    model.hparams["activation"] = torch.nn.Tanh()
    metric = {"name": "acc", "value": 1.0, "data": "iris", "protocol": "x"}
    with pytest.raises(TypeError, match="hyper_parameters.activation"):
        hub.export_pretrained(
            model, "bad", model="iris", metric=metric, data_license="x", out_dir=checkpoint_folder
        )


def test_unknown_names_suggest_close_matches(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    with pytest.raises(KeyError, match="'iris-test'"):
        zoo.load_pretrained("iris-tset")
    with pytest.raises(KeyError, match="zoo list"):
        zoo.create_model("no-such-model-anywhere")


def test_pretrained_fine_tunes_in_user_trainer(checkpoint_folder: Path, tmp_path: Path) -> None:
    _export_iris(checkpoint_folder)
    model = zoo.load_pretrained("iris-test")
    data = IrisDataModule(batch_size=20)
    data.setup()
    x, y = data.train_set.tensors
    before = torch.nn.functional.cross_entropy(model(x), y).item()
    trainer = pl.Trainer(
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    model.eval()
    after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert after < before - 0.1


def test_every_registered_config_names_importable_classes() -> None:
    names = zoo.list_models()
    assert names, "no registered models found in zoo/configs"
    for name in names:
        config = hub.load_config(name)
        assert hub.import_class(config["model"]["class_path"])
        assert hub.import_class(config["data"]["class_path"])


def test_every_shipped_checkpoint_verifies() -> None:
    for name in zoo.list_pretrained():
        manifest = hub.read_manifest(name)
        path = hub.checkpoint_dir() / manifest["file"]
        hub.verify_checkpoint(path, manifest["sha256"])
        assert manifest["model"] in zoo.list_models(), f"{name} names unknown model"
        assert {"name", "value", "data", "protocol"} <= set(manifest["metric"])


def _rewrite_payload(folder: Path, **changes: object) -> None:
    weights = folder / "iris-test.pt"
    payload = torch.load(weights, weights_only=True)
    payload.update(changes)
    torch.save(payload, weights)
    manifest_path = folder / "iris-test.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hub.sha256_file(weights)
    manifest_path.write_text(json.dumps(manifest))


def test_class_path_must_name_a_module(checkpoint_folder: Path, tmp_path: Path) -> None:
    # A checkpoint whose hash matches its manifest still must not call an arbitrary function
    # with its hyperparameters as keyword arguments.
    _export_iris(checkpoint_folder)
    marker = tmp_path / "ran"
    _rewrite_payload(
        checkpoint_folder, class_path="os.system", hyper_parameters={"command": f"touch {marker}"}
    )
    with pytest.raises(ValueError, match="'os.system', which is not a torch.nn.Module"):
        zoo.load_pretrained("iris-test")
    assert not marker.exists()
    _rewrite_payload(checkpoint_folder, class_path="builtins.dict")
    with pytest.raises(ValueError, match="'builtins.dict'"):
        zoo.load_pretrained("iris-test")


def test_broken_manifest_names_the_file(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    manifest_path = checkpoint_folder / "iris-test.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON") as error:
        zoo.load_pretrained("iris-test")
    assert str(manifest_path) in str(error.value)
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}))
    with pytest.raises(ValueError, match=r"lacks the string field\(s\) \['sha256'\]"):
        zoo.load_pretrained("iris-test")
    manifest_path.write_text(json.dumps({**manifest, "file": "../../etc/hostname"}))
    with pytest.raises(ValueError, match="not a plain file name"):
        zoo.load_pretrained("iris-test")


def test_upper_case_manifest_hash_verifies(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    manifest_path = checkpoint_folder / "iris-test.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "sha256": manifest["sha256"].upper()}))
    assert isinstance(zoo.load_pretrained("iris-test"), IrisClassifier)


def test_names_with_path_separators_are_unknown(checkpoint_folder: Path) -> None:
    _export_iris(checkpoint_folder)
    with pytest.raises(KeyError, match="Unknown pretrained checkpoint"):
        zoo.load_pretrained("../checkpoints/iris-test")
    registered = hub.list_models()[0]
    with pytest.raises(KeyError, match="Unknown model"):
        hub.config_path(f"../configs/{registered}")


def test_pretrained_overrides_keep_provenance() -> None:
    name = "opt-qpnet-digits"
    model = zoo.create_model(name, pretrained=True, num_classes=3)
    pretrained = zoo.load_pretrained(name)
    assert model.hparams.num_classes == 3
    assert model.zoo_pretrained["name"] == name
    assert model.training
    # The encoder keeps its pretrained weights; only the resized head starts fresh.
    assert torch.equal(model.encoder[0].weight, pretrained.encoder[0].weight)


def test_list_rejects_non_string_pattern() -> None:
    with pytest.raises(TypeError, match="pattern must be a shell-style string"):
        zoo.list_models(3)
    with pytest.raises(TypeError, match="got None"):
        zoo.list_pretrained(None)
