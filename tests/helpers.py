"""Test helpers: the ``zoo`` command in a subprocess, and a quiet in-process Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_zoo(
    args: list[str],
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m zoo.cli ARGS`` in ``cwd`` and return the finished process.

    Weights & Biases is disabled unless ``env`` sets ``WANDB_MODE``. With ``check=True``
    a non-zero exit raises ``AssertionError`` carrying the tail of stdout and stderr.
    """
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    process = subprocess.run(
        [sys.executable, "-m", "zoo.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and process.returncode != 0:
        raise AssertionError(
            f"zoo {' '.join(args)} exited with {process.returncode}\n"
            f"--- stdout ---\n{process.stdout[-4000:]}\n--- stderr ---\n{process.stderr[-6000:]}"
        )
    return process


def quiet_trainer(callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
    """Return a one-device CPU Trainer without loggers, checkpoints or progress output.

    ``options`` go to ``pl.Trainer`` (``max_steps``, ``max_epochs``, ``limit_val_batches``...).
    """
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )
