"""The ``zoo`` command: LightningCLI subcommands plus ``train`` and ``list``.

- ``zoo fit|validate|test|predict --config FILE`` are LightningCLI's subcommands. Any
  LightningModule and LightningDataModule can be named by ``class_path`` in the config.
- ``zoo train NAME [--overrides]`` runs ``fit`` with the registered model's config.
- ``zoo list [PATTERN]`` prints the registered models and the pretrained checkpoints.

Unless the config sets them, every run gets these defaults:

- ``trainer.default_root_dir = runs/NAME``, with a CSV logger and an offline Weights &
  Biases logger under it;
- a ``ModelCheckpoint`` in ``runs/NAME/checkpoints`` that keeps ``last.ckpt``, so that
  ``--ckpt_path last`` resumes;
- RNG states in every checkpoint;
- line-based progress when stdout is not a terminal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from zoo import hub
from zoo.callbacks.progress import LineProgress
from zoo.callbacks.resume import RNGStateCheckpoint

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
WANDB_PROJECT = "zoo"

#: Trainer options where an int counts batches and a float is a fraction of the epoch.
#: jsonargparse parses both ``1`` and ``1.0`` of these as the float 1.0 (a whole epoch).
INT_OR_FRACTION_OPTIONS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
    "val_check_interval",
)
_INTEGER = re.compile(r"[+-]?\d+")


def integer_trainer_options(args: list[str]) -> dict[str, int]:
    """Return the options of :data:`INT_OR_FRACTION_OPTIONS` that ``args`` give as integers.

    Both ``--trainer.KEY VALUE`` and ``--trainer.KEY=VALUE`` count, and so do the
    ``trainer`` section of every ``--config`` (or ``-c``) file and a ``--trainer FILE``. A later value replaces an earlier one,
    as in LightningCLI; a later non-integer value removes the key.
    """
    found: dict[str, int] = {}

    def record(key: str, value: object) -> None:
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            found[key] = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
        else:
            found.pop(key, None)

    for index, token in enumerate(args):
        name, equals, inline = token.partition("=")
        if equals:
            value = inline
        elif index + 1 < len(args):
            value = args[index + 1]
        else:
            continue
        if name in ("--config", "-c", "--trainer"):
            config = _yaml_argument(value)
            if name == "--trainer":
                trainer = config
            else:
                trainer = config.get("trainer") if isinstance(config, dict) else None
            for key in INT_OR_FRACTION_OPTIONS:
                if isinstance(trainer, dict) and key in trainer:
                    record(key, trainer[key])
        elif name.startswith("--trainer.") and name[len("--trainer.") :] in INT_OR_FRACTION_OPTIONS:
            record(name[len("--trainer.") :], value)
    return found


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's default loggers, checkpointing and progress output."""

    def __init__(self, args: list[str] | None = None, run_name: str | None = None) -> None:
        """Parse ``args`` (default: ``sys.argv[1:]``) and run the subcommand.

        Args:
            args: command-line arguments, starting with the subcommand.
            run_name: name of the run folder under ``runs/``. The default is the stem of
                the last ``--config`` file.
        """
        self.run_name = run_name
        self._raw_args = list(sys.argv[1:] if args is None else args)
        super().__init__(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=IntegerPreservingSaveConfig,
            save_config_kwargs={
                "overwrite": True,
                "integers": integer_trainer_options(self._raw_args),
            },
            args=args,
            parser_kwargs={"default_env": False},
        )

    def _resolve_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        config_files = self._get(self.config, "config") or []
        if config_files:
            return Path(str(config_files[-1])).stem
        model = self._get(self.config, "model")
        class_path = getattr(model, "class_path", None) or "model"
        return class_path.rsplit(".", 1)[-1].lower()

    def before_instantiate_classes(self) -> None:
        # Written into the config namespace so that the saved config.yaml names the same
        # folder, and `zoo validate --config runs/NAME/.../config.yaml` logs beside the run.
        trainer_config = self._get(self.config, "trainer")
        if not trainer_config.get("default_root_dir"):
            trainer_config["default_root_dir"] = os.path.join(RUNS_DIR, self._resolve_run_name())
        _restore_integers(trainer_config, self._raw_args)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_config = self._get(self.config_init, "trainer", default={})
        # Instantiation parsed the options again, so the integers set before it are floats.
        _restore_integers(trainer_config, self._raw_args)
        root = trainer_config["default_root_dir"]
        run_name = Path(root).name

        configured_logger = trainer_config.get("logger")
        if configured_logger is None or configured_logger is True:
            kwargs.setdefault("logger", default_loggers(root, run_name))

        callbacks = list(trainer_config.get("callbacks") or [])
        callbacks.extend(kwargs.pop("callbacks", []) or [])
        if not any(isinstance(callback, ModelCheckpoint) for callback in callbacks):
            callbacks.append(
                ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True)
            )
        if not any(isinstance(callback, RNGStateCheckpoint) for callback in callbacks):
            callbacks.append(RNGStateCheckpoint())
        progress_enabled = trainer_config.get("enable_progress_bar") is not False
        has_progress = any(isinstance(callback, ProgressBar) for callback in callbacks)
        if progress_enabled and not has_progress and not sys.stdout.isatty():
            callbacks.append(LineProgress())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def _yaml_argument(value: str) -> Any:
    """Return the YAML of a config argument, read from its file or inline, else None."""
    try:
        if Path(value).is_file():
            return yaml.safe_load(Path(value).read_text())
        if value.lstrip().startswith("{"):
            return yaml.safe_load(value)
    except (OSError, yaml.YAMLError):
        return None  # LightningCLI reports the unreadable argument itself.
    return None


class IntegerPreservingSaveConfig(SaveConfigCallback):
    """Save the run's config with the integer batch limits that jsonargparse turned into floats.

    Args:
        *args: Passed to ``SaveConfigCallback``.
        integers: Trainer options to write back as ints (see :func:`integer_trainer_options`).
        **kwargs: Passed to ``SaveConfigCallback``.
    """

    def __init__(self, *args: Any, integers: dict[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.integers = dict(integers or {})

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        writes = self.save_to_log_dir and not self.already_saved and bool(self.integers)
        # trainer.log_dir runs a collective under DDP, so every process must call it.
        log_dir = trainer.log_dir if writes else None
        super().setup(trainer, pl_module, stage)
        if not writes or not trainer.is_global_zero or log_dir is None:
            return
        path = Path(log_dir) / self.config_filename
        config = yaml.safe_load(path.read_text())
        trainer_config = config.get("trainer") or {}
        for key, value in self.integers.items():
            if trainer_config.get(key) == value:
                trainer_config[key] = value
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def _restore_integers(trainer_config: Any, args: list[str]) -> None:
    """Set the batch-count options that ``args`` give as integers back to int values."""
    for key, value in integer_trainer_options(args).items():
        if trainer_config.get(key) == value:
            trainer_config[key] = value


def default_loggers(root: str, run_name: str) -> list[Logger]:
    """Return the CSV logger and, unless ``WANDB_MODE=disabled``, a Weights & Biases logger.

    Weights & Biases runs offline (files under ``ROOT/wandb``) unless the environment sets
    ``WANDB_MODE=online``. ``wandb sync`` uploads an offline run later.
    """
    loggers: list[Logger] = [CSVLogger(save_dir=root, name="csv")]
    wandb_mode = os.environ.get("WANDB_MODE", "offline").lower()
    if wandb_mode != "disabled":
        loggers.append(
            WandbLogger(
                save_dir=root,
                project=WANDB_PROJECT,
                name=run_name,
                offline=wandb_mode != "online",
            )
        )
    return loggers


def format_listing(pattern: str = "*") -> str:
    """Return the table that ``zoo list`` prints: registered models, then checkpoints."""
    lines = ["Registered models (zoo train NAME):"]
    models = hub.list_models(pattern)
    lines.extend(f"  {name:<24} {hub.describe_model(name)}".rstrip() for name in models)
    if not models:
        lines.append("  (none)")
    lines.append("")
    lines.append("Pretrained checkpoints (zoo.load_pretrained(NAME)):")
    checkpoints = hub.list_pretrained(pattern)
    for name in checkpoints:
        manifest = hub.read_manifest(name)
        metric = manifest.get("metric", {})
        value = metric.get("value")
        value_text = f"{value:.4f}" if isinstance(value, float) else str(value)
        line = f"  {name:<24} model={manifest.get('model')}  {metric.get('name')}={value_text}"
        line += f" on {metric.get('data')}"
        privacy = (manifest.get("extra") or {}).get("privacy")
        if privacy:
            line += f"  epsilon={privacy.get('epsilon'):.3g} delta={privacy.get('delta'):.1e}"
        lines.append(line)
    if not checkpoints:
        lines.append("  (none)")
    return "\n".join(lines)


USAGE = """usage: zoo {fit,validate,test,predict} --config FILE [--key value ...]
       zoo train NAME [--key value ...]
       zoo list [PATTERN]
"""


def main(argv: list[str] | None = None) -> None:
    """Run the ``zoo`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command == "list":
        pattern = argv[1] if len(argv) > 1 else "*"
        sys.stdout.write(format_listing(pattern) + "\n")
        return
    if command in ("-h", "--help", ""):
        sys.stdout.write(USAGE)
        if command:
            return
        raise SystemExit(2)

    run_name = None
    if command == "train":
        if len(argv) < 2 or argv[1].startswith("-"):
            sys.stderr.write(f"zoo train: missing model NAME.\n{USAGE}")
            raise SystemExit(2)
        run_name = argv[1]
        try:
            path = hub.config_path(run_name)
        except KeyError as error:
            sys.stderr.write(f"zoo train: {error.args[0]}\n")
            raise SystemExit(2) from None
        argv = ["fit", "--config", str(path), *argv[2:]]

    if not from_command_line:
        ZooCLI(args=argv, run_name=run_name)
        return
    # DDP re-launches this command from sys.argv in every process, and LightningCLI
    # reads sys.argv itself, so `zoo train NAME` is rewritten to its `fit` form there.
    sys.argv = [sys.argv[0], *argv]
    try:
        ZooCLI(run_name=run_name)
    except (ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get("ZOO_TRACEBACK"):
            raise
        sys.stderr.write(
            f"zoo: error: {short_error(error)}\n(set ZOO_TRACEBACK=1 to see the traceback)\n"
        )
        raise SystemExit(1) from None


def short_error(error: BaseException) -> str:
    """Return the message of an error in a user's input without jsonargparse's wrapping.

    A constructor that rejects a value inside a ``class_path`` config reaches the user as
    jsonargparse's "Does not validate against any of the Union subtypes" error, which
    lists the constructor's message among the subtypes it tried and the whole namespace.
    """
    text = str(error)
    if "Does not validate against any of the Union subtypes" not in text:
        return f"{type(error).__name__}: {text}"
    reasons = [
        line.strip()[2:]
        for line in text.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    return "; ".join(reasons) if reasons else text


if __name__ == "__main__":
    main()
