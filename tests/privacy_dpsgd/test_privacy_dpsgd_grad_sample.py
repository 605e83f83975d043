"""DPSGD callback: a clear error when Opacus' hooks give a parameter no per-sample gradient."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import quiet_trainer
from zoo.privacy.dpsgd import DPSGD, _check_grad_samples


class _DiscardedCallModel(pl.LightningModule):
    """Call ``inner`` once more on a probe input and drop the output, like a step-size evaluation."""

    def __init__(self, discard: bool) -> None:
        super().__init__()
        self.discard = discard
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.discard:
            self.inner(x * 0.5)
        return self.head(self.inner(x).tanh())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model: pl.LightningModule, mode: str = "hooks") -> None:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=generator), torch.randint(0, 2, (64,)))
    dpsgd = DPSGD(noise_multiplier=1.0, accountant="rdp", seed=0, grad_sample_mode=mode)
    trainer = quiet_trainer([dpsgd], max_steps=2)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=16))


def test_dpsgd_names_parameters_without_grad_sample() -> None:
    with pytest.raises(ValueError, match=r"no per-sample gradient for parameters inner\.weight"):
        _fit(_DiscardedCallModel(discard=True))


def test_expanded_weights_train_despite_discarded_call() -> None:
    # Expanded weights compute per-example gradients in the backward pass of the loss
    # alone, so an evaluation whose output is dropped does not disturb them.
    model = _DiscardedCallModel(discard=True)
    before = model.inner.weight.detach().clone()
    _fit(model, mode="ew")
    assert not torch.equal(model.inner.weight, before)


def test_dpsgd_trains_when_every_call_reaches_loss() -> None:
    model = _DiscardedCallModel(discard=False)
    before = model.inner.weight.detach().clone()
    _fit(model)
    assert not torch.equal(model.inner.weight, before)


class _CubeFunction(torch.autograd.Function):
    """``x ** 3`` in the old style (ctx in forward), which torch.func cannot transform."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return (x @ weight.t()) ** 3

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, weight = ctx.saved_tensors
        inner = 3 * (x @ weight.t()) ** 2 * grad
        return inner @ weight, inner.t() @ x


class _CubeLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 4) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return _CubeFunction.apply(x, self.weight)


class _CustomFunctionModel(_DiscardedCallModel):
    def __init__(self) -> None:
        super().__init__(discard=False)
        self.head = _CubeLayer()


def test_dpsgd_explains_custom_autograd_function() -> None:
    with pytest.warns(UserWarning, match=r"layers head: they call a custom torch\.autograd"):
        with pytest.raises(RuntimeError, match="setup_context"):
            _fit(_CustomFunctionModel())


def test_missing_grad_sample_names_torch_func_layer() -> None:
    # The face model's margin head takes this path: torch.func leaves its weight without
    # a per-sample gradient instead of failing.
    model = _DiscardedCallModel(discard=False)
    optimizer = SimpleNamespace(params=list(model.parameters()))
    with pytest.raises(ValueError, match=r"Layers head have no Opacus grad sampler"):
        _check_grad_samples(optimizer, model, ["head"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pair every forward call"):
        _check_grad_samples(optimizer, model, [])  # type: ignore[arg-type]
