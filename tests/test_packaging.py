"""Packaging: the editable install the Makefile makes (``pip install -e .``) warns about nothing.

The build runs setuptools' PEP 517 hook (what pip calls) on a copy of the packaging
files and packages in a temporary directory, in a fresh interpreter, recording every
warning: pip 26.3 shows a backend's warnings even under ``--quiet``, so a warning
here is a line in the first ``make demo``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the top-level directories of pyproject.toml's [tool.setuptools] packages (a build with
# one missing fails)
PACKAGE_DIRS = ("shared", "tf_impl", "torch_impl")

_BUILD = """
import json, sys, warnings
from setuptools import build_meta
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wheel = build_meta.build_editable(sys.argv[1])
print(json.dumps({"wheel": wheel, "warnings": [f"{w.category.__name__}: {w.message}"
                                               for w in caught]}))
"""


def _project_copy(root: Path) -> Path:
    """What pip builds from: pyproject.toml, its readme and the packages, nothing else."""
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    for top in PACKAGE_DIRS:
        shutil.copytree(REPO / top, project / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return project


def test_editable_build_warns_nothing_and_puts_the_checkout_on_sys_path(tmp_path):
    project = _project_copy(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    done = subprocess.run([sys.executable, "-c", _BUILD, str(wheels)], cwd=project,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert built["warnings"] == [], built["warnings"]
    with zipfile.ZipFile(wheels / built["wheel"]) as wheel:
        pth = {n: wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".pth")}
    # one static path entry: the checkout's root, where shared/, tf_impl/, torch_impl/ are
    assert list(pth.values()) == [f"{project.resolve()}\n"], pth
