"""Vector fields ``f(t, y)`` for neural ODEs, chosen by name."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; use an integer >= 1.")


class TimeConcatMLP(nn.Module):
    """Time-dependent tanh MLP: ``[y, t] -> tanh -> [h, t] -> tanh``.

    The layout of the MNIST neural ODE in the ERNODE reference implementation, where time
    is appended to the input of every layer.

    Args:
        state_size: Size ``D`` of the state.
        hidden_size: Width of the hidden layer.
    """

    def __init__(self, state_size: int, hidden_size: int = 100) -> None:
        super().__init__()
        _check_size("state_size", state_size)
        _check_size("hidden_size", hidden_size)
        self.hidden = nn.Linear(state_size + 1, hidden_size)
        self.output = nn.Linear(hidden_size + 1, state_size)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        """Return ``dy/dt`` for states ``y [batch, D]`` at time ``t`` (0-d, or ``[batch]``)."""
        time = t.to(y.dtype)
        time = time.reshape(-1, 1).expand(y.shape[0], 1) if time.dim() <= 1 else time
        hidden = self.hidden(torch.cat([y, time], dim=-1)).tanh()
        return self.output(torch.cat([hidden, time], dim=-1)).tanh()


class AutonomousMLP(nn.Module):
    """Autonomous tanh MLP ``f(y)`` with a leading tanh, as in latent ODE dynamics.

    Args:
        state_size: Size ``D`` of the state.
        hidden_size: Width of every hidden layer.
        num_layers: Number of hidden layers (>= 1).
    """

    def __init__(self, state_size: int, hidden_size: int = 50, num_layers: int = 2) -> None:
        super().__init__()
        _check_size("state_size", state_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        layers: list[nn.Module] = [nn.Tanh()]
        width = state_size
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        layers.append(nn.Linear(width, state_size))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        """Return ``dy/dt`` for states ``y`` of shape ``[batch, D]``; ``t`` is ignored."""
        return self.net(y)


VECTOR_FIELDS = {"time_concat_mlp": TimeConcatMLP, "autonomous_mlp": AutonomousMLP}


def build_vector_field(name: str, state_size: int, **kwargs: Any) -> nn.Module:
    """Build a vector field by name (``"time_concat_mlp"`` or ``"autonomous_mlp"``).

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name not in VECTOR_FIELDS:
        raise ValueError(f"Unknown vector field {name!r}; choose one of {sorted(VECTOR_FIELDS)}.")
    return VECTOR_FIELDS[name](state_size, **kwargs)
