"""Registry of named models and their pretrained checkpoints.

A *registered model* is a LightningCLI config ``configs/NAME.yaml`` (installed as
``zoo/configs``). A *pretrained checkpoint* is a pair ``checkpoints/NAME.pt`` and
``checkpoints/NAME.json`` (installed as ``zoo/checkpoints``), where the JSON manifest
records the file's SHA-256, the registered model it was trained from, the metric it
reaches with the data and protocol of that measurement, the model's hyperparameters and
the license of the training data.

Checkpoint files hold plain values only (tensors, numbers, strings, lists, dicts), so they
load with ``torch.load(weights_only=True)`` and never unpickle arbitrary objects.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "zoo-checkpoint-v1"
CACHE_DIR_ENV = "ZOO_CACHE_DIR"


def config_dir() -> Path:
    """Return the folder that contains the registered models' YAML configs."""
    return Path(str(resources.files("zoo.configs")))


def checkpoint_dir() -> Path:
    """Return the folder that contains the shipped checkpoints and their manifests."""
    return Path(str(resources.files("zoo.checkpoints")))


def list_models(pattern: str = "*") -> list[str]:
    """Return the sorted names of registered models that match a shell-style ``pattern``."""
    _check_pattern(pattern)
    names = (path.stem for path in config_dir().glob("*.yaml"))
    return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    """Return the sorted names of pretrained checkpoints that match ``pattern``."""
    _check_pattern(pattern)
    names = (path.stem for path in checkpoint_dir().glob("*.json"))
    return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))


def _check_pattern(pattern: object) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a shell-style string such as 'face-*', got {pattern!r}.")


def _unknown_name_error(kind: str, name: str, known: list[str]) -> KeyError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"Unknown {kind} {name!r}.{hint} Run `zoo list` to see all {len(known)} names.")


def config_path(name: str) -> Path:
    """Return the path of the registered model's config.

    Raises:
        KeyError: if ``name`` is not registered; the message suggests the closest names.
    """
    path = config_dir() / f"{name}.yaml"
    if "/" in name or "\\" in name or not path.is_file():
        raise _unknown_name_error("model", name, list_models())
    return path


def describe_model(name: str) -> str:
    """Return the first comment line of the model's config, which describes the model."""
    with open(config_path(name)) as handle:
        for line in handle:
            stripped = line.strip()
            if stripped.startswith("#"):
                return stripped.lstrip("#").strip()
            if stripped:
                break
    return ""


def load_config(name: str) -> dict[str, Any]:
    """Return the parsed YAML config of a registered model."""
    with open(config_path(name)) as handle:
        return yaml.safe_load(handle)


def import_class(class_path: str) -> type:
    """Import ``package.module.ClassName`` and return the class."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"Invalid class path {class_path!r}: expected 'package.module.Class'.")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError as error:
        raise ImportError(f"Module {module_name!r} has no class {class_name!r}.") from error


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> torch.nn.Module:
    """Build the registered model ``name`` from its config.

    Args:
        name: a registered model name (see :func:`list_models`).
        pretrained: load the pretrained checkpoint of the same name (or the first one
            whose manifest names this model) instead of random weights.
        **overrides: constructor arguments that replace the config's ``model.init_args``.

    Raises:
        KeyError: for an unknown model name, or ``pretrained=True`` without a checkpoint.
        TypeError: for an override that the model's constructor does not accept.
    """
    config = load_config(name)
    model_section = config.get("model") or {}
    class_path = model_section.get("class_path")
    if not class_path:
        raise ValueError(f"Config {config_path(name)} has no model.class_path.")
    cls = import_class(class_path)
    init_args = dict(model_section.get("init_args") or {})
    init_args.update(overrides)
    if not pretrained:
        return cls(**init_args)

    checkpoint_name = _pretrained_for_model(name)
    module = load_pretrained(checkpoint_name)
    if overrides:
        # Rebuild with the overrides and copy over every weight whose shape still fits,
        # so that e.g. a new number of classes keeps the pretrained backbone.
        fresh = cls(**{**dict(module.hparams), **overrides})
        _load_matching(fresh, module.state_dict())
        fresh.zoo_pretrained = module.zoo_pretrained
        return fresh.train()
    return module


def _pretrained_for_model(model_name: str) -> str:
    names = list_pretrained()
    if model_name in names:
        return model_name
    for name in names:
        if read_manifest(name).get("model") == model_name:
            return name
    raise KeyError(
        f"Model {model_name!r} has no pretrained checkpoint. Pretrained checkpoints: "
        f"{', '.join(names) or 'none'}; use create_model({model_name!r}) for random weights."
    )


def _load_matching(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    own = module.state_dict()
    kept = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(kept))
    if skipped:
        logger.info("Kept random initialisation for %d tensors: %s", len(skipped), skipped)
    module.load_state_dict(kept, strict=False)


MANIFEST_KEYS = ("file", "sha256")


def read_manifest(name: str) -> dict[str, Any]:
    """Return the JSON manifest of the pretrained checkpoint ``name``.

    Raises:
        KeyError: if no checkpoint has that name; the message suggests the closest names.
        ValueError: if the manifest is not valid JSON, lacks ``file`` or ``sha256``, or its
            ``file`` is not a plain file name inside the checkpoint folder.
    """
    path = checkpoint_dir() / f"{name}.json"
    if "/" in name or "\\" in name or not path.is_file():
        raise _unknown_name_error("pretrained checkpoint", name, list_pretrained())
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Manifest {path} is not valid JSON ({error}); reinstall the package or "
            "re-export the checkpoint with zoo.hub.export_pretrained."
        ) from error
    if not isinstance(manifest, dict):
        raise ValueError(f"Manifest {path} must be a JSON object, got {type(manifest).__name__}.")
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest.get(key), str)]
    if missing:
        raise ValueError(
            f"Manifest {path} lacks the string field(s) {missing}; re-export the checkpoint "
            "with zoo.hub.export_pretrained."
        )
    file_name = manifest["file"]
    if Path(file_name).name != file_name or file_name in ("", ".", ".."):
        raise ValueError(
            f"Manifest {path} names the file {file_name!r}, which is not a plain file name "
            "in the checkpoint folder; the weights must sit beside the manifest."
        )
    return manifest


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_checkpoint_file(manifest: dict[str, Any]) -> Path:
    local = checkpoint_dir() / manifest["file"]
    if local.is_file():
        return local
    url = manifest.get("url")
    if not url:
        raise FileNotFoundError(
            f"Checkpoint file {local} is missing and the manifest names no URL. "
            "Reinstall the package to restore it."
        )
    from zoo.datamodules.paths import download_with_checksum

    cache = Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "zoo" / "checkpoints"))
    return download_with_checksum(url, cache / manifest["file"], manifest["sha256"])


def verify_checkpoint(path: str | os.PathLike, expected_sha256: str) -> None:
    """Check a checkpoint file against its manifest hash before anything reads it.

    Raises:
        ValueError: naming the file and both hashes when they differ.
    """
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ValueError(
            f"Checkpoint {path} failed verification: manifest sha256 {expected_sha256}, "
            f"file sha256 {actual}. The file is truncated, corrupted or replaced; reinstall "
            "the package or re-download the checkpoint."
        )


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a zoo checkpoint file with ``weights_only=True`` and check its layout."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError or EOFError here
        raise ValueError(
            f"Checkpoint {path} could not be read ({type(error).__name__}: {error}). "
            "It is truncated or not a zoo checkpoint; re-export it with "
            "zoo.hub.export_pretrained."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"Checkpoint {path} is not in the {CHECKPOINT_FORMAT!r} format; re-export it with "
            "zoo.hub.export_pretrained."
        )
    return payload


def load_pretrained(name: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load the pretrained checkpoint ``name``.

    The file's SHA-256 is checked against the manifest first; a mismatch raises
    ``ValueError`` naming the file and both hashes. The module comes back in training
    mode, as timm's ``create_model`` returns it, so that it fine-tunes directly with a
    user's own ``Trainer`` and datamodule (Lightning's ``fit`` keeps the mode it finds).
    Call ``.eval()`` before using it for inference outside a ``Trainer``.
    """
    manifest = read_manifest(name)
    path = _resolve_checkpoint_file(manifest)
    verify_checkpoint(path, manifest["sha256"])
    payload = load_checkpoint_file(path)
    cls = _import_module_class(payload["class_path"], path)
    module = cls(**payload["hyper_parameters"])
    module.load_state_dict(payload["state_dict"], strict=True)
    extra = payload.get("extra") or {}
    if extra and hasattr(module, "on_load_pretrained_extra"):
        module.on_load_pretrained_extra(extra)
    module.zoo_pretrained = {"name": name, "extra": extra, "metric": manifest.get("metric")}
    return module.to(map_location).train()


def _import_module_class(class_path: Any, path: str | os.PathLike) -> type[torch.nn.Module]:
    # The class is called with the checkpoint's hyperparameters, so anything other than an
    # nn.Module subclass (os.system, say) would run code chosen by whoever wrote the file.
    if not isinstance(class_path, str):
        raise ValueError(f"Checkpoint {path} has a non-string class_path {class_path!r}.")
    cls = import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(
            f"Checkpoint {path} names class_path {class_path!r}, which is not a torch.nn.Module "
            "subclass; the file is not a zoo checkpoint. Re-export it with "
            "zoo.hub.export_pretrained."
        )
    return cls


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; use string keys.")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}, not a plain value. Checkpoints load with "
        "weights_only=True, so hyperparameters must be numbers, strings, lists or dicts; "
        "choose sub-modules by name and keyword arguments instead of passing objects."
    )


def export_pretrained(
    module: torch.nn.Module,
    name: str,
    *,
    model: str,
    metric: Mapping[str, Any],
    data_license: str,
    extra: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike = "checkpoints",
    url: str | None = None,
) -> Path:
    """Write ``NAME.pt`` and its manifest ``NAME.json`` into ``out_dir``.

    Args:
        module: a LightningModule whose ``hparams`` rebuild it.
        name: the pretrained checkpoint's name, e.g. ``"face-unpg"``.
        model: the registered model (config name) it was trained from.
        metric: ``{"name", "value", "data", "protocol"}`` of the reached metric.
        data_license: license of the training data.
        extra: plain values stored beside the weights (for example a privacy state), also
            copied into the manifest.
        out_dir: destination folder, by default the repository's ``checkpoints/``.
        url: where larger weights can be downloaded from, if the file is not shipped.

    Returns:
        The path of the written manifest.
    """
    missing = {"name", "value", "data", "protocol"} - set(metric)
    if missing:
        raise ValueError(f"metric is missing {sorted(missing)}; got {dict(metric)}.")
    hyper_parameters = dict(getattr(module, "hparams", {}))
    _check_plain(hyper_parameters, "hyper_parameters")
    _check_plain(dict(metric), "metric")
    _check_plain(dict(extra or {}), "extra")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_path = out / f"{name}.pt"
    state_dict = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
        "hyper_parameters": hyper_parameters,
        "state_dict": state_dict,
        "extra": dict(extra or {}),
    }
    torch.save(payload, weights_path)
    manifest = {
        "name": name,
        "model": model,
        "file": weights_path.name,
        "sha256": sha256_file(weights_path),
        "size_bytes": weights_path.stat().st_size,
        "metric": dict(metric),
        "config": {"class_path": payload["class_path"], "init_args": hyper_parameters},
        "data_license": data_license,
        "extra": dict(extra or {}),
    }
    if url:
        manifest["url"] = url
    manifest_path = out / f"{name}.json"
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False)
        handle.write("\n")
    logger.info(
        "Exported %s (%d bytes) and %s", weights_path, manifest["size_bytes"], manifest_path
    )
    return manifest_path
