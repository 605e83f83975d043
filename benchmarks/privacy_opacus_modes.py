"""DP-SGD epoch time over non-private epoch time, per Opacus per-sample gradient mode.

The model is a two-convolution MNIST network (16 and 32 channels, ReLU, 32 hidden units) at
batch size 64 on 30 batches of random 28 x 28 inputs. Two settings are timed:

- ``opacus loop``: a plain PyTorch loop with ``PrivacyEngine.make_private`` in each of
  Opacus' modes (hooks, functorch, ew = expanded weights, ghost = ghost clipping), against
  the same loop without privacy;
- ``zoo lightning``: one epoch of ``Trainer.fit`` with the ``zoo.privacy.dpsgd.DPSGD``
  callback in each mode (Poisson batches of expected size 64) against the same fit without
  it. The time counts from the start of the first training batch (after the callback's
  one-off audit of that batch) to the end of the last one. The
  accountant's epsilon evaluation at the end of each epoch is timed on its own, because it
  costs the same for 30 batches as for a full MNIST epoch of 938.

All configurations run interleaved, ``--repeats`` times each, and the minimum time counts,
so that load from other processes on a shared machine affects them alike. Each Opacus mode
is also checked for correctness: one step without noise must give the mean of the clipped
per-example gradients, computed here example by example.

With ``--mnist-dir DIR`` a third setting runs: one epoch of the registered ``dp-mnist-eps3``
model (two-convolution tanh network) on the 55,000 MNIST training images of ``DIR/mnist``,
with the config's logical batch (expected 509 examples) and physical batches of 256,
without privacy and in each mode.

Usage::

    python benchmarks/privacy_opacus_modes.py --repeats 3 [--mnist-dir /path/to/data]
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from zoo.privacy.dpsgd import DPSGD

OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
BATCH_SIZE = 64
NUM_BATCHES = 30
#: Training batches of batch size 64 in one epoch over the 60,000 MNIST training images.
MNIST_EPOCH_BATCHES = 938


def two_conv_net() -> nn.Sequential:
    """Return the two-convolution MNIST network of the benchmark."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, 2, 2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def make_data(seed: int = 0) -> TensorDataset:
    """Return ``BATCH_SIZE * NUM_BATCHES`` random images with random labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH_SIZE * NUM_BATCHES, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (BATCH_SIZE * NUM_BATCHES,), generator=generator)
    return TensorDataset(x, y)


def opacus_epoch(dataset: TensorDataset, mode: str | None) -> float:
    """Time one epoch of the plain loop; ``mode=None`` trains without privacy."""
    torch.manual_seed(0)
    model = two_conv_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=BATCH_SIZE)
    if mode is not None:
        private = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            poisson_sampling=False,
        )
        if mode == "ghost":
            model, optimizer, criterion, loader = private
        else:
            model, optimizer, loader = private
    start = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


class _NetModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = two_conv_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def timed_fit(
    model: pl.LightningModule, data: object, dpsgd: DPSGD | None, **trainer_options: object
) -> float:
    """Fit one epoch, with ``dpsgd`` unless it is None, and return the epoch's batch time."""
    timer = _EpochTimer()
    callbacks: list[pl.Callback] = [timer] if dpsgd is None else [dpsgd, timer]
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_options,
    )
    trainer.fit(model, data)
    return timer.seconds


def lightning_epoch(dataset: TensorDataset, mode: str | None) -> float:
    """Time one epoch of ``Trainer.fit``; ``mode=None`` trains without the DPSGD callback."""
    torch.manual_seed(0)
    dpsgd = None if mode is None else DPSGD(noise_multiplier=1.0, grad_sample_mode=mode)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    return timed_fit(_NetModule(), loader, dpsgd)


class _EpochTimer(pl.Callback):
    """Time the training batches of an epoch, without the one-off set-up and epoch-end hooks.

    The clock starts when the first batch is about to run, after the DPSGD callback's
    one-off audit of the first batch (it runs first, because it comes first in the list).
    """

    seconds = float("nan")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        self.seconds = time.perf_counter() - self._start


def mnist_epoch(data_dir: str, mode: str | None, physical_batch_size: int | None = 256) -> float:
    """Time one epoch of the ``dp-mnist-eps3`` model on real MNIST; ``None`` is non-private.

    ``physical_batch_size=None`` puts each logical batch through the model at once.
    """
    from zoo.datamodules.mnist import MNISTDataModule
    from zoo.hub import create_model

    torch.manual_seed(0)
    dpsgd = None
    if mode is not None:
        dpsgd = DPSGD(
            noise_multiplier=0.68,
            max_physical_batch_size=physical_batch_size,
            grad_sample_mode=mode,
            accountant="rdp",
        )
    data = MNISTDataModule(data_dir=data_dir, batch_size=512, val_size=5000, download=False)
    return timed_fit(create_model("dp-mnist-eps3"), data, dpsgd, limit_val_batches=0)


def accountant_seconds(accountant: str, steps: int) -> float:
    """Time one epsilon evaluation after ``steps`` steps at sample rate 1 / ``NUM_BATCHES``."""
    dpsgd = DPSGD(noise_multiplier=1.0, accountant=accountant)
    dpsgd.accountant.history = [(1.0, 1 / NUM_BATCHES, steps)]
    start = time.perf_counter()
    dpsgd.epsilon()
    return time.perf_counter() - start


def clipped_mean_error(mode: str, max_grad_norm: float = 0.1) -> float:
    """Return the largest deviation of a noiseless DP step's gradient from the exact one.

    The exact value is the mean over the batch of each example's gradient scaled to norm at
    most ``max_grad_norm``, computed example by example.
    """
    torch.manual_seed(1)
    dataset = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    reference_model = two_conv_net()
    model = two_conv_net()
    model.load_state_dict(reference_model.state_dict())

    expected = [torch.zeros_like(p) for p in reference_model.parameters()]
    for x, y in dataset:
        reference_model.zero_grad()
        F.cross_entropy(reference_model(x[None]), y[None]).backward()
        grads = [p.grad for p in reference_model.parameters()]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        for total, grad in zip(expected, grads, strict=True):
            total += factor * grad / len(dataset)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    criterion = nn.CrossEntropyLoss()
    private = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(dataset, batch_size=len(dataset)),
        criterion=criterion,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )
    if mode == "ghost":
        model, optimizer, criterion, loader = private
    else:
        model, optimizer, loader = private
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
    actual = [p.grad for p in model.parameters()]
    return max((a - e).abs().max().item() for a, e in zip(actual, expected, strict=True))


def main() -> None:
    """Run every configuration interleaved and print the ratios as a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--mnist-dir", default=None, help="data folder with mnist/ (optional)")
    parser.add_argument(
        "--physical-batch-size",
        type=int,
        default=256,
        help="largest physical batch of the MNIST setting; 0 runs each logical batch at once",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("zoo").setLevel(logging.ERROR)

    dataset = make_data()
    configs: dict[str, Callable[[], float]] = {
        "opacus loop / none": lambda: opacus_epoch(dataset, None)
    }
    for mode in OPACUS_MODES:
        configs[f"opacus loop / {mode}"] = lambda mode=mode: opacus_epoch(dataset, mode)
    configs["zoo lightning / none"] = lambda: lightning_epoch(dataset, None)
    for mode in OPACUS_MODES:
        configs[f"zoo lightning / {mode}"] = lambda mode=mode: lightning_epoch(dataset, mode)
    if args.physical_batch_size < 0:
        parser.error(
            f"--physical-batch-size must be >= 0, got {args.physical_batch_size}; "
            "0 runs each logical batch at once."
        )
    physical = args.physical_batch_size or None
    if args.mnist_dir is not None:
        configs["mnist dp-mnist-eps3 / none"] = lambda: mnist_epoch(args.mnist_dir, None)
        for mode in OPACUS_MODES:
            configs[f"mnist dp-mnist-eps3 / {mode}"] = lambda mode=mode: mnist_epoch(
                args.mnist_dir, mode, physical
            )

    times: dict[str, list[float]] = {name: [] for name in configs}
    for function in configs.values():  # warm-up
        function()
    for _ in range(args.repeats):
        for name, function in configs.items():
            # Garbage of the previous configuration (a whole Trainer) would otherwise be
            # collected inside this configuration's timed loop.
            gc.collect()
            times[name].append(function())

    errors = {mode: clipped_mean_error(mode) for mode in OPACUS_MODES}
    print(
        f"| setting | mode | epoch time (s, min of {args.repeats}) | DP / non-private | max abs error of clipped mean |"
    )
    print("|---|---|---|---|---|")
    for name, values in times.items():
        setting, mode = name.split(" / ")
        baseline = min(times[f"{setting} / none"])
        best = min(values)
        error = errors.get(mode)
        shown_error = "" if error is None else f"{error:.1e}"
        ratio = "1.00x" if mode == "none" else f"{best / baseline:.2f}x"
        print(f"| {setting} | {mode} | {best:.3f} | {ratio} | {shown_error} |")

    print(
        "\n| accountant | epsilon evaluation (s) | hooks / none, full MNIST epoch | best mode, full MNIST epoch |"
    )
    print("|---|---|---|---|")
    per_batch = {
        mode: min(times[f"zoo lightning / {mode}"]) / NUM_BATCHES
        for mode in ("none", *OPACUS_MODES)
    }
    fastest = min(OPACUS_MODES, key=per_batch.__getitem__)
    for accountant in ("prv", "rdp"):
        seconds = min(accountant_seconds(accountant, MNIST_EPOCH_BATCHES) for _ in range(3))
        baseline = MNIST_EPOCH_BATCHES * per_batch["none"]
        ratios = [
            (MNIST_EPOCH_BATCHES * per_batch[mode] + seconds) / baseline
            for mode in ("hooks", fastest)
        ]
        print(f"| {accountant} | {seconds:.3f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x ({fastest}) |")


if __name__ == "__main__":
    main()
