"""scripts/build-deb: the same checkout gives the same bytes, and the package holds what a
host needs and nothing a host should not (no compiler, no Ceph server, no test tool)."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.functional.test_ansible import _section  # the one reader of packages.txt's sections in the tests

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.real, pytest.mark.slow]


def _build(out: Path) -> Path:
    run = subprocess.run([str(ROOT / "scripts" / "build-deb"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return Path(run.stdout.strip().splitlines()[-1])


def test_the_package_is_reproducible_and_lean(tmp_path):
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1], "two builds of one checkout differ"

    def field(name):
        return subprocess.run(["dpkg-deb", "--field", str(first), name], capture_output=True, text=True,
                              check=True).stdout.strip()
    depends = [d.strip() for d in field("Depends").split(",")]
    assert set(_section("runtime")) <= set(depends) and "python3-libvirt" in depends
    assert not set(depends) & set(_section("dev")), depends  # no gcc, libvirt-dev, Ceph servers
    assert [d.strip() for d in field("Recommends").split(",")] == _section("ceph-client")
    listing = subprocess.run(["dpkg-deb", "--contents", str(first)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    files = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert all(line.split()[1] == "root/root" for line in listing)
    wheels = [f for f in files if f.startswith("./opt/nodeagent/wheels/") and f.endswith(".whl")]
    assert any("/nodeagent-" in w for w in wheels) and any("/flask-" in w for w in wheels)
    assert not any("libvirt" in w.lower() for w in wheels), "libvirt comes from Debian's python3-libvirt"
    for path in ("./lib/systemd/system/nodeagent.service", "./usr/bin/nodeagent", "./usr/share/nodeagent/agent.toml"):
        assert path in files, path
