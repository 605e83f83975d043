"""Train face-unpg in one process and under DDP on two CPU processes, and compare the metrics.

The DDP run uses half the per-process batch size, so both runs take the same number of
optimizer steps with the same global batch (64 images). Unless ``--no-gather`` is given,
UNPG gathers the embeddings of both processes, so that it mines negatives among the same
64 embeddings as the single-process run. The script prints the final validation metrics of
both runs as JSON.

Usage (from the repository root, with the ORL faces under ``$ZOO_DATA_DIR/faces/orl``)::

    python benchmarks/face_ddp_parity.py
    python benchmarks/face_ddp_parity.py --single-run runs/face-unpg   # reuse a finished run
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

KEYS = ("val/accuracy", "val/auc", "val/tar_at_far_0.01", "val/tar_at_far_0.001")


def final_metrics(run_dir: Path) -> dict[str, float]:
    """Return the last logged value of each key in ``KEYS`` from the run's CSV log."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"No csv/version_*/metrics.csv under {run_dir}.")
    with open(files[-1]) as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows if r.get(key)][-1] for key in KEYS}


def train(run_dir: Path, *overrides: str) -> None:
    """Run ``zoo train face-unpg`` into ``run_dir`` with extra command-line overrides."""
    command = [sys.executable, "-m", "zoo.cli", "train", "face-unpg"]
    command += ["--trainer.default_root_dir", str(run_dir), *overrides]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/face-ddp-parity", help="folder for both runs")
    parser.add_argument("--single-run", default=None, help="finished single-process run folder")
    parser.add_argument(
        "--no-gather", action="store_true", help="mine UNPG negatives within each process"
    )
    args = parser.parse_args()
    out = Path(args.out)
    single = Path(args.single_run) if args.single_run else out / "single"
    if args.single_run is None:
        train(single)
    ddp = out / "ddp"
    train(
        ddp,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--data.init_args.batch_size=32",
        f"--model.init_args.unpg_gather={str(not args.no_gather).lower()}",
    )
    print(json.dumps({"single": final_metrics(single), "ddp": final_metrics(ddp)}, indent=2))


if __name__ == "__main__":
    main()
