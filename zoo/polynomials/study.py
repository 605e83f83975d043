"""Sample-complexity study: test error against sample size for several input dimensions.

Each cell of the study is one (method, d, n, seed): draw a target h = g(p(x)) of input
dimension d, train a method on n fresh samples, and record its normalised test MSE on a
fresh test set. Results are appended to a JSON-lines file one cell at a time, so an
interrupted study resumes where it stopped and finished cells are skipped.

The methods are the layerwise three-layer network (``layerwise``) and the two baselines,
ridge regression on random ReLU features (``random_features``) and a two-layer ReLU
network trained end to end with AdamW (``two_layer``). They run in memory on the plain
``nn.Module``s, without a Trainer, because a study has hundreds of small fits.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zoo.polynomials.baselines import RANDOM_FEATURE_RIDGES, RandomFeatureModel
from zoo.polynomials.layerwise import DEFAULT_RIDGES, fit_layerwise
from zoo.polynomials.networks import ThreeLayerNetwork, TwoLayerNetwork
from zoo.polynomials.ridge import ridge_sums
from zoo.polynomials.targets import HierarchicalPolynomial

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "StudySettings",
    "fit_scaling_exponent",
    "plot_study",
    "run_cell",
    "run_study",
    "summarize",
    "threshold_sample_sizes",
]

METHODS = ("layerwise", "random_features", "two_layer")


@dataclass(frozen=True)
class StudySettings:
    """Target and method settings shared by every cell of a study.

    Attributes:
        feature_degree: Degree k of p.
        link_coefficients: Hermite coefficients of the link g.
        num_test_samples: Size of each fresh test set.
        feature_fraction: Share of the n samples used for stage 1 of the layerwise method
            (D1). The rest form D2.
        feature_width: Frozen random features m2 of the three-layer network.
        hidden_width: Middle width m1 of the three-layer network.
        random_feature_count: Number of random features of the ridge baseline.
        two_layer_width: Hidden width of the two-layer baseline.
        two_layer_steps: AdamW steps of the two-layer baseline.
        two_layer_batch_size: Mini-batch size of the two-layer baseline.
        two_layer_learning_rate: AdamW learning rate of the two-layer baseline.
        layerwise_ridges: Candidate stage-2 penalties of the layerwise method (GCV).
        random_feature_ridges: Candidate penalties of the ridge baseline (GCV).
    """

    feature_degree: int = 2
    link_coefficients: tuple[float, ...] = (0.0, 1.0, 0.0, 1.0)
    num_test_samples: int = 4096
    feature_fraction: float = 0.75
    feature_width: int = 4096
    hidden_width: int = 64
    random_feature_count: int = 1024
    two_layer_width: int = 256
    two_layer_steps: int = 1000
    two_layer_batch_size: int = 256
    two_layer_learning_rate: float = 1e-3
    layerwise_ridges: tuple[float, ...] = field(default=DEFAULT_RIDGES)
    random_feature_ridges: tuple[float, ...] = field(default=RANDOM_FEATURE_RIDGES)


def _normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    prediction, target = prediction.double(), target.double()
    return float(((prediction - target) ** 2).mean() / target.var(unbiased=False))


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _fit_two_layer(
    x: torch.Tensor, y: torch.Tensor, settings: StudySettings, seed: int
) -> TwoLayerNetwork:
    torch.manual_seed(seed)
    net = TwoLayerNetwork(x.shape[1], settings.two_layer_width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.two_layer_learning_rate)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(settings.two_layer_batch_size, x.shape[0])
    for _ in range(settings.two_layer_steps):
        index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        loss = F.mse_loss(net(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net


def _fit_random_features(
    x: torch.Tensor, y: torch.Tensor, settings: StudySettings, seed: int
) -> RandomFeatureModel:
    model = RandomFeatureModel(x.shape[1], settings.random_feature_count, "relu", seed)
    sums: dict[str, torch.Tensor] | None = None
    for start in range(0, x.shape[0], 4096):
        with torch.no_grad():
            features = model.random_features(x[start : start + 4096])
        batch = ridge_sums(features, y[start : start + 4096])
        sums = batch if sums is None else {key: sums[key] + batch[key] for key in sums}
    assert sums is not None
    model.fit(sums, settings.random_feature_ridges)
    return model


def run_cell(
    method: str, input_dim: int, num_samples: int, seed: int, settings: StudySettings
) -> dict[str, Any]:
    """Train one method on one draw of the data and return its test metrics.

    The target, the training sample and the test sample depend only on
    ``(input_dim, seed)`` and ``num_samples``, so every method of a cell gets the same
    data for training and testing.

    Returns:
        A dict with the cell's key, ``nmse`` (normalised test MSE), ``seconds`` (wall
        time of the fit) and, for ``layerwise``, ``feature_corr`` (correlation of the
        stage-1 pre-activation with p on the test set).

    Raises:
        ValueError: For an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
    target = HierarchicalPolynomial(
        input_dim, settings.feature_degree, settings.link_coefficients, seed=seed
    )
    test_generator = torch.Generator().manual_seed(10_000 + seed)
    x_test, y_test, p_test = target.sample(settings.num_test_samples, test_generator)
    train_generator = torch.Generator().manual_seed(num_samples * 1_000 + seed)
    x, y, _ = target.sample(num_samples, train_generator)

    result: dict[str, Any] = {"method": method, "d": input_dim, "n": num_samples, "seed": seed}
    start = time.perf_counter()
    if method == "layerwise":
        net = ThreeLayerNetwork(
            input_dim,
            settings.feature_width,
            settings.hidden_width,
            f"hermite{settings.feature_degree}",
            "relu",
            seed=seed,
        )
        split = max(1, min(num_samples - 2, round(settings.feature_fraction * num_samples)))
        fit_layerwise(
            net,
            (x[:split], y[:split]),
            (x[split:], y[split:]),
            ridges=settings.layerwise_ridges,
            seed=seed + 2,
        )
        model: torch.nn.Module = net
        with torch.no_grad():
            feature = net.preactivations(x_test, with_bias=False)[:, 0]
        result["feature_corr"] = abs(_correlation(feature, p_test))
    elif method == "random_features":
        model = _fit_random_features(x, y, settings, seed)
    else:
        model = _fit_two_layer(x, y, settings, seed)
    result["seconds"] = time.perf_counter() - start
    result["nmse"] = _normalized_mse(_predict(model, x_test), y_test)
    return result


def _cell_key(record: dict[str, Any]) -> tuple[str, int, int, int]:
    return (record["method"], int(record["d"]), int(record["n"]), int(record["seed"]))


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines results file; a missing file gives an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_study(
    results_path: str | Path,
    dims: Sequence[int],
    sample_sizes: Sequence[int],
    seeds: Sequence[int],
    methods: Sequence[str] = METHODS,
    settings: StudySettings | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every missing cell of the study and append each result to ``results_path``.

    Cells already in the file are skipped, so rerunning the same call resumes an
    interrupted study. The settings are written with every record; a file whose records
    carry different settings raises instead of mixing two studies.

    Returns:
        All records of the file after the run.

    Raises:
        ValueError: For an unknown method, or a results file written with other settings.
    """
    settings = settings or StudySettings()
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(METHODS)}.")
    settings_record = json.loads(json.dumps(asdict(settings)))
    records = load_results(results_path)
    for record in records:
        if record.get("settings") != settings_record:
            raise ValueError(
                f"{results_path} contains results computed with settings "
                f"{record.get('settings')}, not {settings_record}; use another results file "
                "or delete this one."
            )
    done = {_cell_key(record) for record in records}
    cells = [
        (method, d, n, seed)
        for d in dims
        for n in sample_sizes
        for seed in seeds
        for method in methods
        if (method, d, n, seed) not in done
    ]
    logger.info("%d cells to run, %d already in %s", len(cells), len(done), results_path)
    iterator: Iterable = cells
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cells, desc="sample-complexity cells", unit="cell")
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    for method, d, n, seed in iterator:
        record = run_cell(method, d, n, seed, settings)
        record["settings"] = settings_record
        with open(results_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        records.append(record)
    return records


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group records by (method, d, n) and return mean and standard deviation over seeds."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["method"], int(record["d"]), int(record["n"]))].append(record)
    rows = []
    for (method, d, n), group in sorted(groups.items()):
        nmse = np.array([record["nmse"] for record in group])
        row = {
            "method": method,
            "d": d,
            "n": n,
            "seeds": len(group),
            "nmse_mean": float(nmse.mean()),
            "nmse_std": float(nmse.std()),
        }
        correlations = [record["feature_corr"] for record in group if "feature_corr" in record]
        if correlations:
            row["feature_corr_mean"] = float(np.mean(correlations))
        rows.append(row)
    return rows


def threshold_sample_sizes(
    rows: Iterable[dict[str, Any]], threshold: float
) -> dict[tuple[str, int], float | None]:
    """Estimate, per (method, d), the smallest n at which the mean NMSE reaches ``threshold``.

    The crossing is interpolated linearly in (log n, log NMSE) between the last grid
    point above the threshold and the first one at or below it. None means the curve
    never reaches the threshold on the grid.
    """
    curves: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        curves[(row["method"], row["d"])].append((row["n"], row["nmse_mean"]))
    estimates: dict[tuple[str, int], float | None] = {}
    for key, curve in curves.items():
        curve.sort()
        estimates[key] = None
        for index, (n, nmse) in enumerate(curve):
            if nmse > threshold:
                continue
            if index == 0:
                estimates[key] = float(n)
            else:
                n0, e0 = curve[index - 1]
                fraction = (math.log(e0) - math.log(threshold)) / (math.log(e0) - math.log(nmse))
                estimates[key] = math.exp(math.log(n0) + fraction * (math.log(n) - math.log(n0)))
            break
    return estimates


def fit_scaling_exponent(sample_sizes_by_dim: dict[int, float]) -> float:
    """Return the least-squares slope of log n* against log d.

    Raises:
        ValueError: With fewer than two dimensions.
    """
    if len(sample_sizes_by_dim) < 2:
        raise ValueError(
            f"Fitting an exponent needs n* for at least two dimensions, got {sample_sizes_by_dim}."
        )
    dims = np.log(np.array(sorted(sample_sizes_by_dim), dtype=float))
    sizes = np.log(np.array([sample_sizes_by_dim[d] for d in sorted(sample_sizes_by_dim)]))
    slope, _ = np.polyfit(dims, sizes, 1)
    return float(slope)


METHOD_LABELS = {
    "layerwise": "three-layer, layerwise",
    "random_features": "random-feature ridge",
    "two_layer": "two-layer, end to end",
}


def plot_study(rows: Sequence[dict[str, Any]], threshold: float | None = None) -> Any:
    """Draw NMSE against n on log-log axes, one panel per d, with one line per method.

    Error bars are one standard deviation over seeds. Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({row["d"] for row in rows})
    figure, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    for axis, d in zip(axes, dims, strict=True):
        for method in METHODS:
            curve = sorted((r for r in rows if r["d"] == d and r["method"] == method), key=_n)
            if not curve:
                continue
            axis.errorbar(
                [r["n"] for r in curve],
                [r["nmse_mean"] for r in curve],
                yerr=[r["nmse_std"] for r in curve],
                marker="o",
                capsize=3,
                label=METHOD_LABELS[method],
            )
        if threshold is not None:
            axis.axhline(threshold, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"d = {d}")
        axis.set_xlabel("training samples n")
    axes[0].set_ylabel("test MSE / Var(h)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def _n(row: dict[str, Any]) -> int:
    return row["n"]
