"""scripts/build-deb: the same checkout gives the same bytes, and the package holds what a
host needs and nothing a host should not (no compiler, no Ceph server, no test tool)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.functional.conftest import build_deb
from tests.functional.test_ansible import _section  # the one reader of packages.txt's sections in the tests

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def builds(built_deb, tmp_path_factory):
    """Two builds of this checkout."""
    return built_deb, build_deb(tmp_path_factory.mktemp("debs"))


def test_the_package_is_reproducible_and_lean(builds):
    first, second = builds
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


def test_the_package_installs_where_systemd_does_not_run(builds):
    """dpkg -i in a Debian 12 root without a running systemd (a chroot: systemd-nspawn, not
    booted; the root of scripts/build-systemd-image, which holds the [runtime] packages): the
    postinst makes the venv, installs the config, enables the unit for a later boot and
    starts nothing."""
    from testbed import systemd_host
    if not shutil.which("systemd-nspawn"):
        pytest.fail("systemd-nspawn missing: run scripts/setup-host ([dev] of scripts/packages.txt)")
    deb = builds[0]
    base = Path(tempfile.mkdtemp(prefix="nodeagent-chroot-"))
    merged = base / "merged"
    for d in ("upper", "work", "merged"):
        (base / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={systemd_host.image()},"
                    f"upperdir={base / 'upper'},workdir={base / 'work'}", str(merged)], check=True)
    try:
        script = (f"test ! -d /run/systemd/system && dpkg -i /debs/{deb.name} && "
                  "/opt/nodeagent/venv/bin/nodeagent --config /etc/nodeagent/agent.toml config >/dev/null && "
                  "stat -c %a /etc/nodeagent/agent.toml && readlink /etc/systemd/system/multi-user.target.wants/"
                  "nodeagent.service && ! pgrep -f '^/opt/nodeagent/venv/bin/python'")
        run = subprocess.run(["systemd-nspawn", "-q", "-D", str(merged), "--register=no", "--keep-unit",
                              f"--machine=nodeagent-deb-{os.urandom(4).hex()}", f"--bind-ro={deb.parent}:/debs",
                              "sh", "-c", script], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        lines = run.stdout.split()
        assert "600" in lines and "/lib/systemd/system/nodeagent.service" in lines, run.stdout
    finally:
        subprocess.run(["umount", str(merged)], check=False)
        shutil.rmtree(base, ignore_errors=True)
