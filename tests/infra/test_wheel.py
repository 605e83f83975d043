"""The built wheel installs ``zoo``, ``zoo.datamodules``, ``zoo.callbacks`` and the configs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

CHECK_IMPORTS = """
import sys, zoo, zoo.datamodules.paths, zoo.callbacks.resume, zoo.cli
target = sys.argv[1]
assert zoo.__file__.startswith(target), zoo.__file__
assert zoo.datamodules.paths.__file__.startswith(target), zoo.datamodules.paths.__file__
assert zoo.callbacks.resume.__file__.startswith(target), zoo.callbacks.resume.__file__
models = zoo.list_models()
assert models, "no configs in the wheel"
print(len(models), len(zoo.list_pretrained()))
"""


def test_wheel_installs_zoo_namespace(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "zoo/datamodules/paths.py" in names
    assert "zoo/callbacks/resume.py" in names
    assert not any(name.startswith(("datamodules/", "callbacks/", "tests/")) for name in names)
    for init in (REPO_ROOT / "zoo").rglob("__init__.py"):
        relative = init.relative_to(REPO_ROOT).as_posix()
        assert relative in names, f"{relative} missing: add its package to pyproject.toml"
    shipped_configs = {
        Path(n).stem for n in names if n.startswith("zoo/configs/") and n.endswith(".yaml")
    }
    repo_configs = {path.stem for path in (REPO_ROOT / "configs").glob("*.yaml")}
    assert shipped_configs == repo_configs
    shipped_checkpoints = {
        n for n in names if n.startswith("zoo/checkpoints/") and n.endswith(".pt")
    }
    assert len(shipped_checkpoints) == len(list((REPO_ROOT / "checkpoints").glob("*.pt")))

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # PYTHONPATH entries come before the editable-install finder, so the wheel's copy wins.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK_IMPORTS, str(target)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
