"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "ZOO_TEST_DATA"


def find_shared_data() -> Path | None:
    """Return the staged real-data folder, or None when this checkout has none.

    ``$ZOO_TEST_DATA`` wins; otherwise the folder ``shared/data`` beside the repository,
    which is where CI places it.
    """
    from_env = os.environ.get(SHARED_DATA_ENV)
    candidates = [Path(from_env)] if from_env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the staged real datasets (faces, MNIST, Adult, time series)."""
    path = find_shared_data()
    if path is None:
        pytest.skip(
            f"real datasets not found: set ${SHARED_DATA_ENV} or place them at "
            f"{REPO_ROOT.parent / 'shared' / 'data'}"
        )
    return path


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests that need the Weights & Biases logger set WANDB_MODE themselves.
    monkeypatch.setenv("WANDB_MODE", "disabled")
