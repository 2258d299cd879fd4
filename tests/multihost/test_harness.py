"""The multi-host harness itself: two simulated hosts whose libvirtds migrate a guest
over a real TLS connection, and nothing of them left afterwards. Their libvirtds take only
TLS clients with a certificate of the run's CA and an allowed name; a migration with
VIR_MIGRATE_TLS carries memory and disk (NBD) encrypted: a marker on the guest's disk
crosses the wire in cleartext without it and never with it."""
import shutil
import socket
import ssl
import uuid

import libvirt
import pytest

from testbed import harness, pki
from testbed.capture import Capture

pytestmark = pytest.mark.real

BARE_GUEST = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices><serial type='pty'/>{disks}</devices>
</domain>"""
DISK = """<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{path}'/><target dev='vda' bus='virtio'/></disk>"""
LIBVIRT_TCP_PORT, LIBVIRT_TLS_PORT = 16509, 16514
MARKER = b"NODEAGENT-CLEARTEXT-MARKER."  # fills the guest disk's first MARKED bytes
MARKED = 8 * 1024 * 1024


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
        dom = c1.createXML(BARE_GUEST.format(name=name, uuid=uuid.uuid4(), disks=''), 0)
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        dom.migrateToURI3(h2.libvirt_uri, {}, flags)
        moved = c2.lookupByName(name)
        assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert name not in [d.name() for d in c1.listAllDomains()]
        moved.destroy()
    finally:
        c1.close()
        c2.close()


def refused_tls(address: str, ca, cert=None, key=None) -> bool:
    """A TLS client that trusts the CA and shows ``cert`` (or none): True if libvirtd drops it."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection((address, LIBVIRT_TLS_PORT), timeout=10) as s:
            with ctx.wrap_socket(s) as t:
                t.sendall(b"\0" * 28)
                return t.recv(64) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def virsh_hostname(uri: str):
    return harness.sh("virsh", "-c", uri, "hostname", check=False, timeout=30)


def test_libvirtd_takes_only_tls_clients_with_an_allowed_certificate(cluster, tmp_path):
    h1 = cluster.hosts[0]
    with pytest.raises(ConnectionRefusedError):  # nothing listens on plain TCP
        socket.create_connection((h1.address, LIBVIRT_TCP_PORT), timeout=10).close()
    assert virsh_hostname(f"qemu+tcp://{h1.address}/system").returncode != 0
    assert refused_tls(h1.address, cluster.ca.cert)  # no certificate
    assert not refused_tls(h1.address, cluster.ca.cert, cluster.client_pki / "clientcert.pem",
                           cluster.client_pki / "clientkey.pem")  # the allowed one
    # a certificate of another CA, under an allowed name
    other = pki.TestCA(tmp_path / "other-ca")
    forged = other.client_files(tmp_path / "forged", harness.test_client_cn(cluster.tag))
    shutil.copyfile(cluster.ca.cert, forged / "cacert.pem")  # it trusts the real server
    # (virsh itself refuses to present it, so present it by hand)
    assert refused_tls(h1.address, cluster.ca.cert, forged / "clientcert.pem", forged / "clientkey.pem")
    # a certificate of the right CA, under a name not in tls_allowed_dn_list
    stranger = cluster.ca.client_files(tmp_path / "stranger", "a-stranger")
    r = virsh_hostname(f"qemu+tls://{h1.address}/system?pkipath={stranger}")
    assert r.returncode != 0 and "TLS confirmation" in r.stderr, r.stderr  # the server said no
    # the server's certificate must name the address it is reached at
    ok = virsh_hostname(h1.libvirt_uri)
    assert ok.returncode == 0, ok.stderr


def marked_disk(host, name: str, marker_file) -> str:
    path = f"/var/lib/libvirt/images/{name}.qcow2"
    host.run("mkdir", "-p", "/var/lib/libvirt/images")
    host.run("qemu-img", "create", "-q", "-f", "qcow2", path, "32M")
    if marker_file:
        host.run("qemu-io", "-f", "qcow2", "-c", f"write -q -s {marker_file} 0 {MARKED}", path)
    return path


def test_migration_with_tls_shows_no_cleartext_and_without_it_does(cluster, tmp_path):
    """Control first (no VIR_MIGRATE_TLS: the capture does see the marker), then back with
    it: memory and the disk copy cross the wire, the marker does not."""
    h1, h2 = cluster.hosts
    name = f"nasim-{uuid.uuid4().hex[:8]}"
    marker_file = tmp_path / "marker"
    marker_file.write_bytes(MARKER * (MARKED // len(MARKER) + 1))
    path = marked_disk(h1, name, marker_file)
    marked_disk(h2, name, None)
    c1, c2 = libvirt.open(h1.libvirt_uri), libvirt.open(h2.libvirt_uri)
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_NON_SHARED_DISK)
    params = {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"]}
    try:
        dom = c1.createXML(BARE_GUEST.format(name=name, uuid=uuid.uuid4(), disks=DISK.format(path=path)), 0)
        with Capture(h1.uplink) as plain:
            dom.migrateToURI3(h2.libvirt_uri, params, flags)
        assert plain.seen(MARKER), f"the control capture missed the cleartext marker ({plain.bytes} bytes)"
        with Capture(h1.uplink) as tls:
            c2.lookupByName(name).migrateToURI3(h1.libvirt_uri, params, flags | libvirt.VIR_MIGRATE_TLS)
        assert tls.bytes > MARKED, f"the capture saw only {tls.bytes} bytes"
        assert not tls.seen(MARKER), "the disk copy crossed the wire in cleartext"
        back = c1.lookupByName(name)
        assert back.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        back.destroy()
        h1.run("qemu-img", "convert", "-O", "raw", path, str(tmp_path / "back.raw"))
        with open(tmp_path / "back.raw", "rb") as f:  # the disk came back intact
            assert f.read(MARKED) == marker_file.read_bytes()[:MARKED]
    finally:
        for c in (c1, c2):
            try:
                c.lookupByName(name).destroy()
            except libvirt.libvirtError:
                pass
            c.close()
