"""LightningModule for the layerwise training of a three-layer network.

Lightning runs the stages as epochs, one stage per epoch, under manual optimisation:

- stage 0, feature learning: one full-batch gradient step on the middle layer W over D1;
- stage 1, calibration: the step size and the middle-layer biases are set from the
  spread of the learned pre-activations over D2 (inputs only);
- stage 2, link fitting: ridge regression of the outer layer on D2.

The buffer ``completed_stages`` records progress, so it is saved in checkpoints: each
epoch runs the first stage not yet done, a resumed run continues where it stopped, and
:meth:`LayerwiseThreeLayer.reset_to_stage` lets a pretrained model refit later stages on
new data.

Each epoch accumulates sums over its batches, adds them over DDP ranks after its last
batch and applies one update, before the epoch's validation runs. The result therefore does not depend on the batch size or the
number of processes, except through the samples that ``DistributedSampler`` repeats to
pad the shards. Training stops once stage 2 is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import PearsonCorrCoef

from zoo.polynomials.evaluation import Batch, PolynomialRegressionModule
from zoo.polynomials.hermite import get_activation, hermite_coefficient
from zoo.polynomials.layerwise import (
    DEFAULT_RIDGES,
    Sums,
    add_sums,
    apply_feature_step,
    apply_link_fit,
    calibrate_hidden_layer,
    feature_step_sums,
    link_fit_sums,
    preactivation_sums,
)
from zoo.polynomials.networks import ThreeLayerNetwork, num_degree_features

__all__ = ["LayerwiseThreeLayer", "validate_feature_activation"]

FEATURE_STEP, CALIBRATION, LINK_FIT = 0, 1, 2
NUM_STAGES = 3
FEATURE_PART, LINK_PART = 0, 1
"""Values of the ``part`` field of a training batch: D1 and D2."""


def validate_feature_activation(name: str, feature_degree: int) -> None:
    """Check that the frozen-layer activation can express a degree-k feature.

    Raises:
        ValueError: If the activation's degree-k Hermite coefficient is zero, because the
            random-feature kernel then has no degree-k part and stage 1 cannot see p
            (ReLU has none of odd degree >= 3, tanh none of even degree).
    """
    activation = get_activation(name)
    scale = max(
        hermite_coefficient(activation, degree) ** 2 for degree in range(feature_degree + 1)
    )
    leading = hermite_coefficient(activation, feature_degree)
    if abs(leading) < 1e-3 * max(scale, 1e-12) ** 0.5:
        raise ValueError(
            f"feature_activation={name!r} has degree-{feature_degree} Hermite coefficient "
            f"{leading:.2e}, so the frozen random features cannot express a degree-"
            f"{feature_degree} feature and stage 1 learns nothing about p. Use "
            f"'hermite{feature_degree}' or another activation with a non-zero "
            f"degree-{feature_degree} coefficient."
        )
    for degree in range(1, feature_degree):
        lower = hermite_coefficient(activation, degree)
        if abs(lower) > 0.1 * abs(leading):
            rank_zero_warn(
                f"feature_activation={name!r} also has degree-{degree} Hermite coefficient "
                f"{lower:.2f}. The first-layer kernel weights degree {degree} about "
                f"d^{feature_degree - degree} times more than degree {feature_degree}, so a "
                f"small degree-{degree} part of the target can swamp p in stage 1."
            )


class LayerwiseThreeLayer(PolynomialRegressionModule):
    """Three-layer network trained layer by layer (Wang, Nichani and Lee, ICLR 2024).

    Training batches are dicts with ``x``, ``y`` and ``part`` (0 for D1, 1 for D2), as
    served by ``zoo.datamodules.polynomials.HierarchicalPolynomialDataModule``. Set
    ``trainer.max_epochs`` to at least 3; training stops itself after stage 2.
    Validation also logs ``val/feature_corr``, the mean over neurons of
    ``|corr(<w_i, phi(x)>, p(x))|``, once stage 1 is done.

    Args:
        input_dim: Input dimension d.
        feature_degree: Degree k of the hidden feature p.
        feature_width: Number m2 of frozen random features. Must be at least the number
            of degree-k monomials in d variables; several times more gives a kernel close
            to its infinite-width limit.
        hidden_width: Number m1 of middle neurons, which also serve as the random features
            of the one-dimensional link fit.
        feature_activation: Activation sigma2 of the frozen layer; None selects
            ``hermite{k}``, the normalised Hermite polynomial of degree k.
        activation: Activation sigma1 of the middle layer.
        learning_rate: Stage-1 step size; None sets it so that the pre-activations have
            standard deviation ``feature_scale`` on D2.
        feature_scale: Standard deviation of the pre-activations after calibration when
            ``learning_rate`` is None.
        bias_range: Half-width, in standard deviations of the learned feature, of the
            interval over which the redrawn biases spread the kinks of sigma1.
        ridges: Candidate ridge penalties for stage 2, chosen by generalised
            cross-validation.
        seed: Seed for the frozen layer, the initial outer weights and the biases.

    Raises:
        ValueError: If a width is too small for a degree-k feature, the frozen activation
            has no degree-k component, or a scale is not positive.
    """

    def __init__(
        self,
        input_dim: int = 16,
        feature_degree: int = 2,
        feature_width: int = 8192,
        hidden_width: int = 128,
        feature_activation: str | None = None,
        activation: str = "relu",
        learning_rate: float | None = None,
        feature_scale: float = 1.0,
        bias_range: float = 6.0,
        ridges: Sequence[float] = DEFAULT_RIDGES,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if feature_activation is None:
            feature_activation = f"hermite{feature_degree}"
        self.save_hyperparameters()
        self._validate_arguments()
        self.automatic_optimization = False
        self.net = ThreeLayerNetwork(
            input_dim, feature_width, hidden_width, feature_activation, activation, seed
        )
        self.register_buffer("completed_stages", torch.zeros((), dtype=torch.long))
        self.val_feature_corr = PearsonCorrCoef(num_outputs=hidden_width)
        self._sums: Sums | None = None
        self._stage = 0

    def _validate_arguments(self) -> None:
        hp = self.hparams
        if not isinstance(hp.feature_degree, int) or hp.feature_degree < 1:
            raise ValueError(
                f"feature_degree must be an integer >= 1, got feature_degree={hp.feature_degree!r}."
            )
        if not isinstance(hp.input_dim, int) or hp.input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {hp.input_dim!r}.")
        required = num_degree_features(hp.input_dim, hp.feature_degree)
        if not isinstance(hp.feature_width, int) or hp.feature_width < required:
            raise ValueError(
                f"feature_width={hp.feature_width!r} is smaller than the {required} monomials "
                f"of degree {hp.feature_degree} in input_dim={hp.input_dim} variables, so the "
                "frozen random features cannot represent a generic degree-"
                f"{hp.feature_degree} feature p whatever the sample size. Use "
                f"feature_width >= {required} (several times more is better)."
            )
        if not isinstance(hp.hidden_width, int) or hp.hidden_width < 2:
            raise ValueError(
                f"hidden_width must be an integer >= 2 to fit a link, got {hp.hidden_width!r}."
            )
        for name in ("feature_scale", "bias_range"):
            if not hp[name] > 0:
                raise ValueError(f"{name} must be > 0, got {name}={hp[name]!r}.")
        if hp.learning_rate is not None and not hp.learning_rate > 0:
            raise ValueError(
                f"learning_rate must be > 0 or None (automatic), got {hp.learning_rate!r}."
            )
        if len(hp.ridges) == 0 or any(not 0 <= r < math.inf for r in hp.ridges):
            raise ValueError(
                f"ridges must be a non-empty list of finite values >= 0, got {hp.ridges!r}."
            )
        get_activation(hp.activation)
        validate_feature_activation(hp.feature_activation, hp.feature_degree)

    def configure_optimizers(self) -> None:
        # Every stage applies a closed-form update after its last batch, so there is no optimizer.
        return None

    @torch.no_grad()
    def reset_to_stage(self, stage: int) -> None:
        """Mark ``stage`` and the stages after it as not done, so the next fit reruns them.

        ``reset_to_stage(2)`` keeps the learned feature and refits only the link, for
        example on new samples. ``reset_to_stage(0)`` restores the initial network (W = 0).

        Raises:
            ValueError: If ``stage`` is not 0, 1 or 2.
        """
        if stage not in (FEATURE_STEP, CALIBRATION, LINK_FIT):
            raise ValueError(f"stage must be 0, 1 or 2, got stage={stage!r}.")
        if stage == FEATURE_STEP:
            hp = self.hparams
            initial = ThreeLayerNetwork(
                hp.input_dim,
                hp.feature_width,
                hp.hidden_width,
                hp.feature_activation,
                hp.activation,
                hp.seed,
            ).to(self.device)
            self.net.load_state_dict(initial.state_dict())
        self.completed_stages.fill_(min(stage, int(self.completed_stages)))

    def on_fit_start(self) -> None:
        remaining = NUM_STAGES - int(self.completed_stages)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs - self.current_epoch < remaining:
            raise ValueError(
                f"trainer.max_epochs={max_epochs} is too small: layerwise training needs "
                f"{remaining} more epochs (one per stage: feature step, calibration, link "
                f"fit) after epoch {self.current_epoch}. Set --trainer.max_epochs "
                f"{self.current_epoch + remaining}."
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("input_dim", "feature_degree"):
            data_value = getattr(datamodule, name, None)
            if data_value is not None and data_value != self.hparams[name]:
                raise ValueError(
                    f"model.{name}={self.hparams[name]} does not match data.{name}="
                    f"{data_value}; set both to the same value."
                )

    def on_train_epoch_start(self) -> None:
        # NOTE: the sums of a stage in progress are not checkpointed, so a checkpoint taken
        # mid-epoch resumes with that stage's sums missing the batches before it.
        self._stage = int(self.completed_stages)
        self._sums = None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        stage = self._stage
        if stage >= NUM_STAGES:
            return
        part = FEATURE_PART if stage == FEATURE_STEP else LINK_PART
        rows = batch["part"] == part
        self._accumulate(stage, batch["x"][rows], batch["y"][rows])
        # Lightning validates before on_train_epoch_end, so finish the stage here.
        if batch_idx == self.trainer.num_training_batches - 1:
            self._finish_stage(stage)

    def _accumulate(self, stage: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if stage == FEATURE_STEP:
            sums = feature_step_sums(self.net, x, y)
        elif stage == CALIBRATION:
            sums = preactivation_sums(self.net, x)
        else:
            sums = link_fit_sums(self.net, x, y)
        self._sums = add_sums(self._sums, sums)

    def on_train_epoch_end(self) -> None:
        stage = self._stage
        if stage < NUM_STAGES and int(self.completed_stages) == stage:
            # Reached only when this epoch ran no training batch at all.
            self._finish_stage(stage)
        if int(self.completed_stages) >= NUM_STAGES:
            self.trainer.should_stop = True

    def _finish_stage(self, stage: int) -> None:
        if self._sums is None:
            # This rank saw no batch; contribute zeros so that the reduction does not hang.
            empty = torch.zeros(0, self.hparams.input_dim, device=self.device)
            self._accumulate(stage, empty, torch.zeros(0, device=self.device))
        sums = {
            key: self.trainer.strategy.reduce(value, reduce_op="sum")
            for key, value in self._sums.items()
        }
        self._sums = None
        if float(sums["count"]) == 0:
            part = FEATURE_PART if stage == FEATURE_STEP else LINK_PART
            raise RuntimeError(
                f"Stage {stage} received no training samples with part={part}; check "
                "limit_train_batches and the datamodule's sample sizes."
            )
        self._apply_stage(stage, sums)
        self.completed_stages.fill_(stage + 1)

    def _apply_stage(self, stage: int, sums: Sums) -> None:
        hp = self.hparams
        if stage == FEATURE_STEP:
            apply_feature_step(
                self.net, sums, 1.0 if hp.learning_rate is None else hp.learning_rate
            )
        elif stage == CALIBRATION:
            generator = torch.Generator().manual_seed(hp.seed + 2)
            scale = hp.feature_scale if hp.learning_rate is None else None
            factor = calibrate_hidden_layer(self.net, sums, scale, hp.bias_range, generator)
            learning_rate = factor if hp.learning_rate is None else hp.learning_rate
            self.log(
                "train/learning_rate", learning_rate, on_step=False, on_epoch=True, sync_dist=True
            )
        else:
            ridge = apply_link_fit(self.net, sums, hp.ridges)
            self.log("train/ridge", ridge, on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if int(self.completed_stages) > FEATURE_STEP:
            values = self.net.preactivations(batch["x"], with_bias=False)
            target = batch["p"].unsqueeze(1).expand_as(values)
            self.val_feature_corr.update(values, target)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if int(self.completed_stages) > FEATURE_STEP and self.val_feature_corr.update_count > 0:
            correlation = self.val_feature_corr.compute().abs().nanmean()
            self.log("val/feature_corr", correlation, sync_dist=True)
        self.val_feature_corr.reset()
