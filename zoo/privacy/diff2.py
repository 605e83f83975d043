"""DIFF2-GD: differentially private gradient descent that privatises gradient differences.

DIFF2 was introduced by Murata and Suzuki, "DIFF2: Differential Private Optimization via
Gradient Differences for Nonconvex Distributed Learning" (ICML 2023). With ``P`` workers
and ``N`` training records in total, round ``r = 0, 1, ...`` of DIFF2-GD is:

* restart round (``r % T == 0``): every worker sends the sum of its per-example gradients
  at ``x_r``, each clipped to norm ``C1``, plus Gaussian noise of std ``sigma1 * C1``. The
  server sets ``v_r = (sum of messages) / N``.
* difference round: every worker sends the sum of its per-example gradient differences
  ``grad l(x_r; z) - grad l(x_{r-1}; z)``, each clipped to norm ``C2_r``, plus noise of std
  ``sigma2 * C2_r``. The server sets ``v_r = v_{r-1} + (sum of messages) / N``.
* update: ``x_{r+1} = x_r - lr * v_r``.

``C2_r`` is either a fixed public value or ``L * ||x_r - x_{r-1}||`` for a public
smoothness constant ``L``. The iterates are already private, so this clip radius leaks
nothing, and it shrinks as the iterates settle, which is where DIFF2 saves noise over
DP-GD. With ``T = 1`` every round is a restart round and DIFF2-GD is DP-GD.

The code here is plain PyTorch and runs without Lightning. :class:`Diff2` is one
process's state. :meth:`Diff2.worker_message` is the worker's half of a round and
:meth:`Diff2.server_update` the server's half, so the same code runs in the Lightning
module (one worker per DDP process, messages summed with ``all_reduce``) and in
:func:`simulate_diff2` (all workers in one process).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

logger = logging.getLogger(__name__)

#: ``loss_fn(outputs, targets)`` returns the loss summed over the batch dimension.
LossFn = Callable[[Tensor, Tensor], Tensor]

#: Added to per-example norms before dividing, the same constant as Opacus' flat clipping.
CLIP_EPSILON = 1e-6


class FlatParameters:
    """Maps between a model's trainable parameters and one flat vector.

    Args:
        model: The network. Its trainable parameters, in ``named_parameters`` order, make up
            the flat vector.
    """

    def __init__(self, model: nn.Module) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise.")
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dim = sum(self.numels)

    def flatten(self, model: nn.Module) -> Tensor:
        """Return a detached copy of the model's trainable parameters as one vector."""
        params = dict(model.named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name in self.names]).clone()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Return ``{name: view}`` with views of ``flat`` in the parameters' shapes."""
        pieces = torch.split(flat, self.numels)
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def load_into(self, model: nn.Module, flat: Tensor) -> None:
        """Copy ``flat`` into the model's trainable parameters."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                params[name].copy_(value)


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """Return ``min(1, max_norm / (norm + 1e-6))`` per example, Opacus' flat clipping rule."""
    return (max_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)


def clip_rows(rows: Tensor, max_norm: float) -> Tensor:
    """Scale each row to L2 norm at most ``max_norm``, as Opacus' flat clipping does."""
    return rows * clip_factors(rows.norm(dim=1), max_norm).unsqueeze(1)


class PerExampleGradients:
    """Clipped sums of per-example gradients of any model, computed with ``torch.func``.

    Materialises the per-example gradients, ``chunk_size`` examples at a time.

    Args:
        model: The network; its buffers are used as they are.
        loss_fn: Loss summed over the batch; it is called on batches of one example.
        chunk_size: Examples per vectorised call, which bounds memory at about
            ``chunk_size * num_parameters`` numbers.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, chunk_size: int = 4096) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.flat = FlatParameters(model)

        def example_loss(flat_params: Tensor, inputs: Tensor, target: Tensor) -> Tensor:
            params = self.flat.unflatten(flat_params)
            outputs = functional_call(self.model, params, (inputs.unsqueeze(0),))
            return self.loss_fn(outputs, target.unsqueeze(0))

        self._per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def chunks(self, flat_params: Tensor, inputs: Tensor, targets: Tensor) -> Iterator[Tensor]:
        """Yield the per-example gradients ``[b, num_parameters]``, ``chunk_size`` at a time."""
        for start in range(0, len(inputs), self.chunk_size):
            stop = start + self.chunk_size
            yield self._per_example(flat_params, inputs[start:stop], targets[start:stop])

    def clipped_sum(
        self, flat_params: Tensor, inputs: Tensor, targets: Tensor, max_norm: float
    ) -> Tensor:
        """Return the sum over examples of per-example gradients clipped to ``max_norm``."""
        total = torch.zeros_like(flat_params)
        for rows in self.chunks(flat_params, inputs, targets):
            total += clip_rows(rows, max_norm).sum(dim=0)
        return total

    def clipped_difference_sum(
        self,
        flat_params: Tensor,
        previous_params: Tensor,
        inputs: Tensor,
        targets: Tensor,
        max_norm: float,
    ) -> Tensor:
        """Return the sum of clipped per-example gradient differences between two points.

        Each example contributes ``clip(grad l(flat_params; z) - grad l(previous_params; z))``.
        """
        total = torch.zeros_like(flat_params)
        now = self.chunks(flat_params, inputs, targets)
        before = self.chunks(previous_params, inputs, targets)
        for rows_now, rows_before in zip(now, before, strict=True):
            total += clip_rows(rows_now - rows_before, max_norm).sum(dim=0)
        return total


#: Parameter-free, elementwise modules that :class:`LinearStackGradients` can pass through.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
)


@dataclass
class _LinearTrace:
    """Inputs ``a [B, in]`` and output gradients ``b [B, out]`` of every Linear layer."""

    inputs: list[Tensor]
    output_grads: list[Tensor]


class LinearStackGradients:
    """Clipped per-example gradient sums of a stack of Linear layers, without materialising.

    For a Linear layer, example ``i``'s weight gradient is the outer product ``b_i a_i^T`` of
    the layer's output gradient and input, so its squared norm is ``|b_i|^2 |a_i|^2``
    (Goodfellow, "Efficient Per-Example Gradient Computations", 2015). The difference of two
    such gradients at two parameter points has squared norm
    ``|b_i|^2 |a_i|^2 - 2 (b_i . b'_i)(a_i . a'_i) + |b'_i|^2 |a'_i|^2``. Clipped sums are then
    matrix products ``(c * b)^T a``. One forward and one backward pass per point replace the
    ``num_parameters``-wide per-example gradients, and the results equal
    :class:`PerExampleGradients` up to rounding.

    Args:
        model: An ``nn.Sequential`` of ``nn.Linear`` layers and modules from
            :data:`ELEMENTWISE_MODULES`, applied to inputs ``[B, features]``.
        loss_fn: Loss summed over the batch.
        chunk_size: Examples per pass.

    Raises:
        TypeError: if ``model`` has another structure; use :class:`PerExampleGradients`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, chunk_size: int = 4096) -> None:
        if not self.supports(model):
            raise TypeError(
                f"LinearStackGradients needs an nn.Sequential of nn.Linear and elementwise "
                f"activations, got {model!r}. Use PerExampleGradients for other models."
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.flat = FlatParameters(model)
        self.linear_names = [
            name for name, module in model.named_children() if isinstance(module, nn.Linear)
        ]

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Return whether ``model`` is a Sequential of Linear and elementwise modules only."""
        if not isinstance(model, nn.Sequential):
            return False
        for module in model.children():
            if isinstance(module, nn.Linear):
                if not module.weight.requires_grad:
                    return False
                if module.bias is not None and not module.bias.requires_grad:
                    return False
            elif not isinstance(module, ELEMENTWISE_MODULES):
                return False
        return True

    def _trace(self, flat_params: Tensor, inputs: Tensor, targets: Tensor) -> _LinearTrace:
        params = self.flat.unflatten(flat_params.detach().requires_grad_(True))
        layer_inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        hidden = inputs
        with torch.enable_grad():
            for name, module in self.model.named_children():
                if isinstance(module, nn.Linear):
                    layer_inputs.append(hidden.detach())
                    hidden = F.linear(hidden, params[f"{name}.weight"], params.get(f"{name}.bias"))
                    outputs.append(hidden)
                else:
                    hidden = module(hidden)
            loss = self.loss_fn(hidden, targets)
            output_grads = torch.autograd.grad(loss, outputs)
        return _LinearTrace(layer_inputs, [g.detach() for g in output_grads])

    def _has_bias(self, index: int) -> bool:
        return getattr(self.model, self.linear_names[index]).bias is not None

    def _weighted_sum(self, trace: _LinearTrace, weights: Tensor) -> Tensor:
        pieces: dict[str, Tensor] = {}
        for index, name in enumerate(self.linear_names):
            scaled = trace.output_grads[index] * weights.unsqueeze(1)
            pieces[f"{name}.weight"] = scaled.T @ trace.inputs[index]
            if self._has_bias(index):
                pieces[f"{name}.bias"] = scaled.sum(dim=0)
        return torch.cat([pieces[name].reshape(-1) for name in self.flat.names])

    def _squared_norms(self, trace: _LinearTrace) -> Tensor:
        total = torch.zeros_like(trace.inputs[0][:, 0])
        for index in range(len(self.linear_names)):
            b_sq = trace.output_grads[index].pow(2).sum(dim=1)
            a_sq = trace.inputs[index].pow(2).sum(dim=1)
            total += b_sq * a_sq + (b_sq if self._has_bias(index) else 0.0)
        return total

    def _squared_difference_norms(self, now: _LinearTrace, before: _LinearTrace) -> Tensor:
        total = torch.zeros_like(now.inputs[0][:, 0])
        for index in range(len(self.linear_names)):
            a, b = now.inputs[index], now.output_grads[index]
            a_old, b_old = before.inputs[index], before.output_grads[index]
            weight_sq = (
                b.pow(2).sum(1) * a.pow(2).sum(1)
                - 2.0 * (b * b_old).sum(1) * (a * a_old).sum(1)
                + b_old.pow(2).sum(1) * a_old.pow(2).sum(1)
            )
            total += weight_sq.clamp(min=0.0)
            if self._has_bias(index):
                total += (b - b_old).pow(2).sum(1)
        return total

    def clipped_sum(
        self, flat_params: Tensor, inputs: Tensor, targets: Tensor, max_norm: float
    ) -> Tensor:
        """Return the sum over examples of per-example gradients clipped to ``max_norm``."""
        total = torch.zeros_like(flat_params)
        for start in range(0, len(inputs), self.chunk_size):
            stop = start + self.chunk_size
            trace = self._trace(flat_params, inputs[start:stop], targets[start:stop])
            factors = clip_factors(self._squared_norms(trace).sqrt(), max_norm)
            total += self._weighted_sum(trace, factors)
        return total

    def clipped_difference_sum(
        self,
        flat_params: Tensor,
        previous_params: Tensor,
        inputs: Tensor,
        targets: Tensor,
        max_norm: float,
    ) -> Tensor:
        """Return the sum of clipped per-example gradient differences between two points."""
        total = torch.zeros_like(flat_params)
        for start in range(0, len(inputs), self.chunk_size):
            stop = start + self.chunk_size
            now = self._trace(flat_params, inputs[start:stop], targets[start:stop])
            before = self._trace(previous_params, inputs[start:stop], targets[start:stop])
            norms = self._squared_difference_norms(now, before).sqrt()
            factors = clip_factors(norms, max_norm)
            total += self._weighted_sum(now, factors) - self._weighted_sum(before, factors)
        return total


def per_example_gradients(
    model: nn.Module, loss_fn: LossFn, chunk_size: int = 4096
) -> PerExampleGradients | LinearStackGradients:
    """Return :class:`LinearStackGradients` where the model allows it, else the generic one."""
    if LinearStackGradients.supports(model):
        return LinearStackGradients(model, loss_fn, chunk_size)
    return PerExampleGradients(model, loss_fn, chunk_size)


def gaussian_noise(
    flat: FlatParameters, std: float, generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """Draw ``N(0, std^2)`` noise for every parameter tensor in order, as one flat vector.

    Drawing tensor by tensor with ``torch.normal`` in the parameters' order consumes the
    generator exactly as Opacus' ``DPOptimizer.add_noise`` does (without ``secure_mode``).
    The noise is drawn on the generator's device (the CPU for :func:`round_generator`) and
    then moved to the device of ``like``.
    """
    if std == 0.0:
        return torch.zeros_like(like)
    device = generator.device if generator is not None else like.device
    pieces = [
        torch.normal(
            mean=0.0,
            std=std,
            size=tuple(shape),
            generator=generator,
            dtype=like.dtype,
            device=device,
        ).reshape(-1)
        for shape in flat.shapes
    ]
    return torch.cat(pieces).to(like.device)


def round_generator(noise_seed: int, worker: int, round_index: int) -> torch.Generator:
    """Return a CPU generator seeded from ``(noise_seed, worker, round_index)``.

    Seeding every round and worker separately makes the noise independent across workers
    and lets an interrupted run resume with the noise it would have drawn.
    """
    sequence = np.random.SeedSequence([noise_seed, worker, round_index])
    seed = int(sequence.generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


@dataclass
class WorkerMessage:
    """One worker's privatised message for one round."""

    #: Sum of clipped per-example gradients (restart) or gradient differences, plus noise.
    vector: Tensor
    #: Whether this is a restart round.
    restart: bool
    #: Clip radius used this round (``C1`` or ``C2_r``).
    clip: float
    #: Number of the worker's records that went into the sum.
    num_records: int


class Diff2:
    """State and rules of DIFF2-GD for one process (one worker plus a copy of the server).

    Every process keeps the same server state (estimate ``v`` and previous iterate), because
    it applies the same summed messages. The model's parameters are the current iterate.

    Args:
        model: The network to train, in the dtype the computation should use (float64 keeps
            the running estimate from drifting over many small difference rounds).
        loss_fn: Loss summed over the batch, for example
            ``lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction="sum")``.
        lr: Step size ``eta`` of the gradient step ``x <- x - eta * v``.
        restart_interval: ``T``; every ``T``-th round (starting with round 0) sends a full
            clipped gradient. ``T = 1`` is DP-GD.
        clip_restart: ``C1``, the per-example gradient clip radius of restart rounds.
        noise_multiplier_restart: ``sigma1``; restart noise std is ``sigma1 * C1``.
        noise_multiplier_difference: ``sigma2``; difference noise std is ``sigma2 * C2_r``.
        clip_difference: Fixed ``C2``; give this or ``smoothness``, not both.
        smoothness: ``L`` in ``C2_r = L * ||x_r - x_{r-1}||``.
        chunk_size: Examples per vectorised per-example gradient call.

    Raises:
        ValueError: if a radius, multiplier, interval or step size is out of range, or both
            or neither of ``clip_difference`` and ``smoothness`` are given while ``T > 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        lr: float,
        restart_interval: int,
        clip_restart: float,
        noise_multiplier_restart: float,
        noise_multiplier_difference: float = 0.0,
        clip_difference: float | None = None,
        smoothness: float | None = None,
        chunk_size: int = 4096,
    ) -> None:
        check_diff2_arguments(
            lr=lr,
            restart_interval=restart_interval,
            clip_restart=clip_restart,
            noise_multiplier_restart=noise_multiplier_restart,
            noise_multiplier_difference=noise_multiplier_difference,
            clip_difference=clip_difference,
            smoothness=smoothness,
        )
        self.model = model
        self.lr = lr
        self.restart_interval = restart_interval
        self.clip_restart = clip_restart
        self.noise_multiplier_restart = noise_multiplier_restart
        self.noise_multiplier_difference = noise_multiplier_difference
        self.clip_difference = clip_difference
        self.smoothness = smoothness
        self.gradients = per_example_gradients(model, loss_fn, chunk_size)
        self.flat = self.gradients.flat
        #: Index of the next round.
        self.round_index = 0
        #: Server's running gradient estimate ``v``; None before the first round.
        self.estimate: Tensor | None = None
        #: Iterate of the previous round ``x_{r-1}``; None before the first round.
        self.previous_params: Tensor | None = None

    def is_restart_round(self, round_index: int | None = None) -> bool:
        """Return whether round ``round_index`` (default: the next one) is a restart round."""
        index = self.round_index if round_index is None else round_index
        return index % self.restart_interval == 0 or self.previous_params is None

    def difference_clip(self, params: Tensor) -> float:
        """Return ``C2_r`` from public settings and the (already private) iterates."""
        if self.clip_difference is not None:
            return float(self.clip_difference)
        assert self.smoothness is not None and self.previous_params is not None
        return float(self.smoothness * (params - self.previous_params).norm())

    def worker_message(
        self, inputs: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> WorkerMessage:
        """Compute this worker's privatised message for the next round on its records.

        Args:
            inputs: The worker's records, all of them (full batch).
            targets: Their targets, in the form ``loss_fn`` expects.
            generator: Source of the Gaussian noise; see :func:`round_generator`.
        """
        params = self.flat.flatten(self.model)
        if self.is_restart_round():
            clip = self.clip_restart
            total = self.gradients.clipped_sum(params, inputs, targets, clip)
            std = self.noise_multiplier_restart * clip
            restart = True
        else:
            assert self.previous_params is not None
            clip = self.difference_clip(params)
            if clip == 0.0:
                total = torch.zeros_like(params)
            else:
                total = self.gradients.clipped_difference_sum(
                    params, self.previous_params, inputs, targets, clip
                )
            std = self.noise_multiplier_difference * clip
            restart = False
        noisy = total + gaussian_noise(self.flat, std, generator, like=total)
        return WorkerMessage(noisy, restart=restart, clip=clip, num_records=len(inputs))

    def server_update(self, message_sum: Tensor, num_records: int, restart: bool) -> Tensor:
        """Fold the summed messages of all workers into ``v`` and take the gradient step.

        Args:
            message_sum: Sum over workers of :attr:`WorkerMessage.vector`.
            num_records: Total number of records over all workers, ``N``.
            restart: Whether the messages are restart messages.

        Returns:
            The new estimate ``v_r``.
        """
        params = self._fold_messages(message_sum, num_records, restart)
        assert self.estimate is not None
        self.flat.load_into(self.model, params - self.lr * self.estimate)
        self.round_index += 1
        return self.estimate

    def _fold_messages(self, message_sum: Tensor, num_records: int, restart: bool) -> Tensor:
        """Set ``v_r`` from the summed messages and ``x_(r-1)`` to ``x_r``, and return ``x_r``."""
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}.")
        params = self.flat.flatten(self.model)
        mean = message_sum / num_records
        if restart or self.estimate is None:
            self.estimate = mean
        else:
            self.estimate = self.estimate + mean
        self.previous_params = params
        return params

    def simulate_round(
        self,
        shards: Sequence[tuple[Tensor, Tensor]],
        num_records: int,
        noise_seed: int,
    ) -> tuple[WorkerMessage, Tensor]:
        """Run one round with all workers in this process, in rank order.

        Worker ``p`` draws its noise from ``round_generator(noise_seed, p, r)``, as rank ``p``
        of the Lightning module does.

        Returns:
            Worker 0's message (its restart flag and clip are every worker's) and ``v_r``.
        """
        round_index = self.round_index
        messages = [
            self.worker_message(inputs, targets, round_generator(noise_seed, p, round_index))
            for p, (inputs, targets) in enumerate(shards)
        ]
        total = messages[0].vector.clone()
        for message in messages[1:]:
            total += message.vector
        estimate = self.server_update(total, num_records, messages[0].restart)
        return messages[0], estimate


def check_diff2_arguments(
    *,
    lr: float,
    restart_interval: int,
    clip_restart: float,
    noise_multiplier_restart: float,
    noise_multiplier_difference: float,
    clip_difference: float | None,
    smoothness: float | None,
) -> None:
    """Raise ValueError or TypeError naming the first invalid DIFF2 setting."""
    if isinstance(restart_interval, bool) or not isinstance(restart_interval, int):
        raise TypeError(f"restart_interval must be an int, got {restart_interval!r}.")
    if restart_interval < 1:
        raise ValueError(f"restart_interval must be >= 1 (1 is DP-GD), got {restart_interval}.")
    positive = {"lr": lr, "clip_restart": clip_restart}
    for name, value in positive.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    multipliers = {
        "noise_multiplier_restart": noise_multiplier_restart,
        "noise_multiplier_difference": noise_multiplier_difference,
    }
    for name, value in multipliers.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    # A zero radius would clip every gradient difference to nothing.
    for name, value in {"clip_difference": clip_difference, "smoothness": smoothness}.items():
        if value is not None and not (
            isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        ):
            raise ValueError(
                f"{name} must be a finite number > 0 or None, got {value!r}. Set it "
                "positive, or to None to use the other difference clip."
            )
    if restart_interval > 1 and (clip_difference is None) == (smoothness is None):
        raise ValueError(
            "Give exactly one of clip_difference (a fixed C2) and smoothness (L, for "
            f"C2 = L * ||x_r - x_(r-1)||); got clip_difference={clip_difference!r}, "
            f"smoothness={smoothness!r}."
        )


@dataclass
class SimulationResult:
    """Final parameters and per-round records of :func:`simulate_diff2`."""

    params: Tensor
    restart: list[bool]
    clip: list[float]
    estimate_norm: list[float]


def simulate_diff2(
    algorithm: Diff2,
    shards: Sequence[tuple[Tensor, Tensor]],
    rounds: int,
    noise_seed: int,
    callback: Callable[[int, Diff2], None] | None = None,
) -> SimulationResult:
    """Run DIFF2 with all workers in this process, in rank order.

    Every round is :meth:`Diff2.simulate_round`, which draws worker ``p``'s noise as rank
    ``p`` of the Lightning module does, so both give the same iterates for the same shards.
    A :class:`~zoo.privacy.diff2_local.Diff2BVRLocalSGD` runs its local steps as well.
    Under DDP, Lightning's ``DistributedSampler`` draws new shards every round. Only the
    local steps depend on them, so to reproduce a DDP run of DIFF2-BVR-L-SGD, call
    :meth:`Diff2.simulate_round` with each round's shards.

    Args:
        algorithm: The state to advance; its model's parameters are the starting point.
        shards: ``(inputs, targets)`` of each worker, in rank order.
        rounds: Number of rounds to run.
        noise_seed: Base seed of the workers' noise.
        callback: Called as ``callback(round_index, algorithm)`` after each round.
    """
    if not shards:
        raise ValueError("shards is empty; give at least one worker's (inputs, targets).")
    num_records = sum(len(inputs) for inputs, _ in shards)
    result = SimulationResult(params=torch.empty(0), restart=[], clip=[], estimate_norm=[])
    for _ in range(rounds):
        round_index = algorithm.round_index
        message, estimate = algorithm.simulate_round(shards, num_records, noise_seed)
        result.restart.append(message.restart)
        result.clip.append(message.clip)
        result.estimate_norm.append(float(estimate.norm()))
        if callback is not None:
            callback(round_index, algorithm)
    result.params = algorithm.flat.flatten(algorithm.model)
    return result
