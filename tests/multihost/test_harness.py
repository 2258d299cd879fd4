"""The multi-host harness itself: two simulated hosts whose libvirtds migrate a guest
over a real TCP connection, and nothing of them left afterwards."""
import shutil
import uuid

import libvirt
import pytest

from testbed import harness

pytestmark = pytest.mark.real

BARE_GUEST = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices><serial type='pty'/></devices>
</domain>"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for tool in ("libvirtd", "virtlogd", "nsenter", "unshare", "ip"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run scripts/setup-host")
    cluster = harness.Cluster(tmp_path_factory.mktemp("sim"))
    with cluster as c:
        yield c
    assert harness.leftovers(cluster.tag) == []


def test_hosts_have_own_addresses_and_private_libvirt(cluster):
    h1, h2 = cluster.hosts
    assert h1.address != h2.address
    assert h1.address in h1.run("ip", "-o", "addr", "show", "eth0").stdout
    c1, c2 = libvirt.open(h1.libvirt_uri), libvirt.open(h2.libvirt_uri)
    try:
        assert c1.getHostname() and c1.getURI() != c2.getURI()
        # the hosts reach each other over the test bridge
        probe = h1.run("virsh", "-c", h2.libvirt_uri, "hostname", check=False, timeout=30)
        assert probe.returncode == 0, probe.stderr
    finally:
        c1.close()
        c2.close()


def test_live_migration_crosses_hosts(cluster):
    h1, h2 = cluster.hosts
    name = f"nasim-{uuid.uuid4().hex[:8]}"
    c1, c2 = libvirt.open(h1.libvirt_uri), libvirt.open(h2.libvirt_uri)
    try:
        dom = c1.createXML(BARE_GUEST.format(name=name, uuid=uuid.uuid4()), 0)
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        dom.migrateToURI3(h2.libvirt_uri, {}, flags)
        moved = c2.lookupByName(name)
        assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert name not in [d.name() for d in c1.listAllDomains()]
        moved.destroy()
    finally:
        c1.close()
        c2.close()
