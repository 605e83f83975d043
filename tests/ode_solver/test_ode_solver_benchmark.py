"""The solver benchmark script runs end to end (its timings are not checked here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ode_solver_vs_torchdiffeq.py"


def test_benchmark_script_prints_table() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--warmup", "0", "--mode", "inference"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    output = completed.stdout + completed.stderr
    assert re.search(r"\| torchdiffeq dopri5 \| \d+ \| \d+ \| [0-9.]+ \| 1\.00x \|", output)
    assert re.search(
        r"\| zoo tsit5, per-sample steps \| \d+ \| \d+ \| [0-9.]+ \| [0-9.]+x \|", output
    )
