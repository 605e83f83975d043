"""The layerwise training procedure for :class:`ThreeLayerNetwork`, without Lightning.

Stage 1 (feature learning) takes one full-batch gradient step on the middle-layer weight
W from W = 0, on the square loss over the first sample D1, after moving the output bias
to the mean label so that the constant part of y does not dominate the step. Every
neuron's pre-activation then becomes a kernel estimate of the low-degree part of the
target, which for the targets in ``zoo.polynomials.targets`` is proportional to the
hidden feature p. Between the stages the step size is set so that the pre-activations
have a chosen standard deviation on the second sample D2, and the biases are redrawn to
tile that range. Stage 2 (link fitting) fits the outer layer by ridge regression on D2.

Every stage is split into per-batch sums (``*_sums``) and a final update (``apply_*``),
so the same code runs in memory (:func:`fit_layerwise`) or streamed over a Lightning
epoch and reduced across DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from zoo.polynomials.networks import ThreeLayerNetwork
from zoo.polynomials.ridge import ridge_sums, solve_ridge

__all__ = [
    "DEFAULT_RIDGES",
    "LayerwiseFit",
    "add_sums",
    "apply_feature_step",
    "apply_link_fit",
    "calibrate_hidden_layer",
    "feature_step_sums",
    "fit_layerwise",
    "link_fit_sums",
    "preactivation_sums",
]

DEFAULT_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Stage-2 ridge penalties among which generalised cross-validation chooses.

The floor of 1e-3 (for middle-layer pre-activations of unit scale) is there because GCV
favours tiny penalties, which let large cancelling outer weights extrapolate wildly in
the tails of the learned feature: at d = 12, n = 4096 a penalty of 1e-6 gave test NMSE
5.9, a penalty of 1e-3 gave 0.33.
"""

Sums = dict[str, torch.Tensor]


def add_sums(total: Sums | None, batch: Sums) -> Sums:
    """Add the tensors of ``batch`` into ``total`` (or start a new total) and return it."""
    if total is None:
        return {key: value.clone() for key, value in batch.items()}
    for key, value in batch.items():
        total[key] += value
    return total


def feature_step_sums(net: ThreeLayerNetwork, x: torch.Tensor, y: torch.Tensor) -> Sums:
    """Return the stage-1 gradient sums for one batch.

    ``loss_grad`` is the gradient of ``sum (f(x) - y)^2`` and ``output_grad`` the gradient
    of ``sum f(x)``, both with respect to W at its current value. Together with the label
    and output sums they give the gradient after the output bias moves to the mean label.
    """
    weight = net.weight.detach().requires_grad_(True)
    with torch.enable_grad():
        output = net(x, weight)
        (loss_grad,) = torch.autograd.grad(((output - y) ** 2).sum(), weight, retain_graph=True)
        (output_grad,) = torch.autograd.grad(output.sum(), weight)
    return {
        "loss_grad": loss_grad.double(),
        "output_grad": output_grad.double(),
        "label_sum": y.double().sum(),
        "output_sum": output.detach().double().sum(),
        "count": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
    }


@torch.no_grad()
def apply_feature_step(net: ThreeLayerNetwork, sums: Sums, learning_rate: float) -> None:
    """Move the output bias to the mean label and take one gradient step on W.

    The loss is the mean square error over D1, so the gradient is the summed gradient
    divided by the sample count.
    """
    count = sums["count"]
    shift = (sums["label_sum"] - sums["output_sum"]) / count
    gradient = (sums["loss_grad"] + 2.0 * shift * sums["output_grad"]) / count
    net.outer_bias.add_(shift.to(net.outer_bias.dtype))
    net.weight.sub_(learning_rate * gradient.to(net.weight.dtype))


@torch.no_grad()
def preactivation_sums(net: ThreeLayerNetwork, x: torch.Tensor) -> Sums:
    """Return per-neuron sums of ``<w_i, phi(x)>`` and of its square, for one batch."""
    values = net.preactivations(x, with_bias=False).double()
    return {
        "sum": values.sum(dim=0),
        "square_sum": (values * values).sum(dim=0),
        "count": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
    }


@torch.no_grad()
def calibrate_hidden_layer(
    net: ThreeLayerNetwork,
    sums: Sums,
    feature_scale: float | None,
    bias_range: float,
    generator: torch.Generator,
) -> float:
    """Rescale W and redraw the biases so the neurons tile the range of the learned feature.

    Args:
        net: Network after :func:`apply_feature_step`.
        sums: Summed outputs of :func:`preactivation_sums` over D2.
        feature_scale: Root-mean-square standard deviation that the pre-activations get;
            None keeps the step size of stage 1.
        bias_range: Each bias is ``-mean_i + U * std_i`` with U uniform on
            ``[-bias_range, bias_range]``, so the kinks of sigma1 spread over
            ``bias_range`` standard deviations of the feature.
        generator: CPU generator for the new biases.

    Returns:
        The factor by which W was multiplied (1.0 when ``feature_scale`` is None).

    Raises:
        RuntimeError: If stage 1 left every pre-activation constant, which happens when
            the labels are constant or no neuron received a gradient.
    """
    count = sums["count"]
    mean = sums["sum"] / count
    std = (sums["square_sum"] / count - mean**2).clamp_min(0.0).sqrt()
    live = std > 1e-12 * std.max().clamp_min(1e-300)
    if not bool(live.any()) or float(std.max()) == 0.0:
        raise RuntimeError(
            "Stage 1 produced constant pre-activations for every neuron, so there is no "
            "feature to fit the link on. Check that the labels vary and that sigma1 has a "
            "non-zero derivative at the initial biases."
        )
    factor = 1.0
    if feature_scale is not None:
        factor = feature_scale / float(std[live].pow(2).mean().sqrt())
    net.weight.mul_(factor)
    mean, std = mean * factor, std * factor
    uniform = torch.rand(net.bias.shape[0], generator=generator, dtype=torch.float64)
    spread = torch.where(live, std, torch.full_like(std, feature_scale or 1.0))
    new_bias = -mean + (2.0 * uniform.to(mean.device) - 1.0) * bias_range * spread
    net.bias.copy_(new_bias.to(net.bias.dtype))
    return factor


@torch.no_grad()
def link_fit_sums(net: ThreeLayerNetwork, x: torch.Tensor, y: torch.Tensor) -> Sums:
    """Return the ridge sums of the middle-layer activations against y, for one batch."""
    sums = ridge_sums(net.hidden(x), y)
    sums["count"] = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    return sums


@torch.no_grad()
def apply_link_fit(net: ThreeLayerNetwork, sums: Sums, ridges: Sequence[float]) -> float:
    """Fit the outer weights and bias by ridge regression; return the chosen penalty."""
    solution = solve_ridge(sums, ridges)
    net.outer_weight.copy_(solution.weight.to(net.outer_weight.dtype))
    net.outer_bias.copy_(solution.bias.to(net.outer_bias.dtype))
    return solution.ridge


@dataclass(frozen=True)
class LayerwiseFit:
    """Outcome of :func:`fit_layerwise`: the stage-1 step size and the stage-2 penalty."""

    learning_rate: float
    ridge: float


def _batches(
    x: torch.Tensor, y: torch.Tensor | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for start in range(0, x.shape[0], batch_size):
        stop = start + batch_size
        yield x[start:stop], None if y is None else y[start:stop]


def _accumulate(
    function: Callable[..., Sums], x: torch.Tensor, y: torch.Tensor | None, batch_size: int
) -> Sums:
    total: Sums | None = None
    for x_batch, y_batch in _batches(x, y, batch_size):
        args = (x_batch,) if y_batch is None else (x_batch, y_batch)
        total = add_sums(total, function(*args))
    assert total is not None
    return total


def fit_layerwise(
    net: ThreeLayerNetwork,
    feature_data: tuple[torch.Tensor, torch.Tensor],
    link_data: tuple[torch.Tensor, torch.Tensor],
    learning_rate: float | None = None,
    feature_scale: float = 1.0,
    bias_range: float = 6.0,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    seed: int = 0,
    batch_size: int = 4096,
) -> LayerwiseFit:
    """Train ``net`` in place by the two-stage procedure on in-memory samples.

    Args:
        net: A freshly constructed network (W = 0).
        feature_data: ``(x, y)`` of D1, used for the stage-1 gradient step.
        link_data: ``(x, y)`` of D2, used to calibrate the biases and fit the outer layer.
        learning_rate: Stage-1 step size; None sets it so that the pre-activations have
            standard deviation ``feature_scale``.
        feature_scale: Target standard deviation of the pre-activations when
            ``learning_rate`` is None.
        bias_range: See :func:`calibrate_hidden_layer`.
        ridges: Candidate ridge penalties for stage 2, chosen by GCV.
        seed: Seed for the redrawn biases.
        batch_size: Rows per chunk, which bounds memory to about
            ``batch_size * feature_width`` floats.
    """
    x1, y1 = feature_data
    x2, y2 = link_data
    step_sums = _accumulate(lambda x, y: feature_step_sums(net, x, y), x1, y1, batch_size)
    apply_feature_step(net, step_sums, 1.0 if learning_rate is None else learning_rate)
    moments = _accumulate(lambda x: preactivation_sums(net, x), x2, None, batch_size)
    generator = torch.Generator().manual_seed(seed)
    scale = None if learning_rate is not None else feature_scale
    factor = calibrate_hidden_layer(net, moments, scale, bias_range, generator)
    link_sums = _accumulate(lambda x, y: link_fit_sums(net, x, y), x2, y2, batch_size)
    ridge = apply_link_fit(net, link_sums, ridges)
    return LayerwiseFit(
        learning_rate=factor if learning_rate is None else learning_rate, ridge=ridge
    )
