"""Save and restore random-number-generator states in checkpoints.

Lightning restores weights, optimizer and loop counters when a run resumes with
``--ckpt_path``, but not the Python, NumPy and torch RNG states. Without them, a resumed
run draws different shuffles, augmentations and dropout masks than an uninterrupted
run with the same seed. This callback stores those states in every checkpoint and puts
them back when training resumes, so that both runs end with the same weights.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

_KEY = "rng_states"


class RNGStateCheckpoint(pl.Callback):
    """Store the Python, NumPy and torch CPU RNG states in checkpoints and restore them.

    The states of the rank that writes the checkpoint (rank zero) are saved. Under DDP,
    every rank restores those states; Lightning's distributed sampler shuffles with
    ``seed + epoch``, so the data order does not depend on them.
    """

    def state_dict(self) -> dict[str, Any]:
        python_version, python_keys, python_gauss = random.getstate()
        _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
        return {
            "python": {"version": python_version, "keys": list(python_keys), "gauss": python_gauss},
            "numpy": {
                "keys": numpy_keys.tolist(),
                "pos": int(numpy_pos),
                "has_gauss": int(numpy_has_gauss),
                "gauss": float(numpy_gauss),
            },
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start: restoring here would be undone by seeding during setup.
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        python = pending["python"]
        random.setstate((python["version"], tuple(python["keys"]), python["gauss"]))
        numpy = pending["numpy"]
        keys = np.array(numpy["keys"], dtype=np.uint32)
        np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
        torch.set_rng_state(pending["torch"])
        self._pending = None

    @property
    def state_key(self) -> str:
        return _KEY
