"""Fixtures shared by the functional tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_deb(out: Path) -> Path:
    """scripts/build-deb of this checkout into ``out``: the .deb's path."""
    run = subprocess.run([str(ROOT / "scripts" / "build-deb"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return Path(run.stdout.strip().splitlines()[-1])


def with_version(deb: Path, version: str, out: Path) -> Path:
    """The same package as ``deb`` under another version (an upgrade for dpkg), repacked
    rather than built again: only the control file's Version differs."""
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text("".join(f"Version: {version}\n" if line.startswith("Version:") else line
                               for line in control.read_text().splitlines(keepends=True)))
    new = out / deb.name.replace(field(deb, "Version"), version)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(tree), str(new)], check=True,
                   capture_output=True)
    return new


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory) -> Path:
    """This checkout's package, built once per run (test_deb builds a second to compare)."""
    return build_deb(tmp_path_factory.mktemp("deb"))
