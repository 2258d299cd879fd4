"""`ruff check` (configured in pyproject.toml) finds nothing in the code base: the packages,
the test bed, the benches, the tests and the Python scripts; mypy finds nothing in the
packages whose types are complete ([tool.mypy] files)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATHS = ("agent", "storage", "hypervisor", "containers", "testbed", "bench", "tests",
         "scripts")  # scripts: the Python ones, listed in [tool.ruff] extend-include


def ruff() -> list[str]:
    """The ruff of the test extras (`pip install -e .[test]`): beside this Python, else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "ruff")
    found = here if os.access(here, os.X_OK) else shutil.which("ruff")
    assert found, "ruff is not installed: .venv/bin/pip install -e '.[test]' (it pins ruff)"
    return [found]


def test_ruff_finds_nothing():
    r = subprocess.run([*ruff(), "check", "--no-cache", "--output-format", "concise", *PATHS],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff check found:\n{r.stdout}{r.stderr}"


def test_the_python_scripts_are_linted():
    r = subprocess.run([*ruff(), "check", "--show-files", "scripts"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert "ceph-dev-cluster" in r.stdout, r.stdout + r.stderr


def test_mypy_finds_nothing_where_types_are_complete():
    here = os.path.join(os.path.dirname(sys.executable), "mypy")
    found = here if os.access(here, os.X_OK) else shutil.which("mypy")
    assert found, "mypy is not installed: .venv/bin/pip install -e '.[test]' (it pins mypy)"
    r = subprocess.run([found, "--cache-dir", os.path.join(REPO, ".mypy_cache")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"mypy found:\n{r.stdout}{r.stderr}"
