"""Fixtures of the ODE model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    # The solver makes many small tensor calls. On a loaded 2-core machine two intra-op
    # threads make them about ten times slower than one, so each test runs single-threaded.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
