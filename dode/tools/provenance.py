"""Where a result came from: parameters, package versions, the git commit (and whether what produces results has
uncommitted changes), the machine and the wall time. The notebooks and the tools write it beside their results."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

from ..util.runtime import machine

#: the repository root (dode/tools/provenance.py is two folders below it)
ROOT = Path(__file__).resolve().parents[2]


def provenance(parameters: dict, seconds: float) -> dict:
    """Where a result came from: parameters, package versions, git commit, machine, wall time."""
    packages = {}
    for name in ("dode", "torch", "diffusers", "torchmetrics", "numpy", "scipy", "scikit-learn", "pandas"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.strip()
        # uncommitted changes to what produces results (the package, the notebooks, the dependencies)
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "dode", "notebooks", "pyproject.toml"],
                                    capture_output=True, text=True, cwd=ROOT).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "parameters": parameters,
        "packages": packages,
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine(),
        "wall_seconds": round(seconds, 1),
    }
