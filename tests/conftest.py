"""Shared fixtures. Real components are started by session fixtures in the suites that
need them; a missing component fails the test with what the machine lacks."""
from __future__ import annotations

import pytest

from agent.state import Database


@pytest.fixture(scope="session", autouse=True)
def no_network_leftovers():
    """Fail the run loudly (an error at its last teardown) if a test left on the host a bridge,
    an agent's NAT rule or nft table whose name this run made (testbed.runtimes records them:
    test_network, agent_rtag, test_rtag; other runs' are never looked at), then remove them.
    A test drops its network with testbed.runtimes.drop_test_network."""
    yield
    from testbed import runtimes
    left = runtimes.leftovers()
    if left:
        for bridge in runtimes.MADE_BRIDGES:
            runtimes.drop_test_network(bridge)
        for rtag in runtimes.MADE_RTAGS:
            runtimes.drop_test_network(None, rtag)
        pytest.fail("tests left these on the host (drop a test network with "
                    "testbed.runtimes.drop_test_network):\n  " + "\n  ".join(left), pytrace=False)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 when asked."""
    from testbed.runtimes import find_free_port
    return find_free_port()


@pytest.fixture
def open_tmp():
    """A dir under /tmp others may traverse (0711; pytest's tmp_path is under a 0700 dir):
    user-namespaced containers' roots must reach their rootfs and bundle in a state dir here."""
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="nodeagent-userns-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def db(tmp_path):
    d = Database(tmp_path / "state.db")
    yield d
    d.close()


@pytest.fixture(scope="session")
def ceph():
    """A live single-node Ceph (scripts/ceph-dev-cluster) for the session: a CephEnv.
    NODEAGENT_CEPH_DIR=<dir of a running cluster> reuses one (and leaves it running)."""
    from testbed import ceph_cluster

    reused = ceph_cluster.existing()
    if reused is not None:
        ceph_cluster._session = reused
        yield reused
        return
    try:
        env = ceph_cluster.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    ceph_cluster._session = env
    try:
        yield env
    finally:
        ceph_cluster.stop(env)


@pytest.fixture(scope="session")
def libvirtd():
    """libvirtd + virtlogd serving qemu:///system; the URI. Started here (and stopped by
    PID at session end) only if none is running."""
    from testbed import libvirt_daemon
    try:
        daemons = libvirt_daemon.ensure()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield daemons.uri
    daemons.stop()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """A docker-registry on 127.0.0.1:<free port> (testbed/registry_server.py); stopped by PID."""
    from testbed.registry_server import RegistryServer
    server = RegistryServer(str(tmp_path_factory.mktemp("registry"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def busybox_ref(oci_registry, tmp_path_factory):
    """Reference of a busybox image built by the tests and pushed to ``oci_registry``."""
    from testbed.registry_server import push_busybox
    return push_busybox(oci_registry, str(tmp_path_factory.mktemp("busybox-image")))


@pytest.fixture(scope="session")
def guest_images():
    """The test guest from scripts/build-test-images (cached, idempotent): a dict of paths
    vmlinuz, initrd, rootfs (qcow2), the kernel cmdline, and boot (a BIOS-bootable qcow2:
    MBR + syslinux + the same kernel and initrd, booted from disk as the API boots VMs)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
    r = subprocess.run([os.path.join(root, "scripts", "build-test-images"), out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"scripts/build-test-images failed: {r.stderr.strip()}")
    return {"vmlinuz": f"{out}/vmlinuz", "initrd": f"{out}/initrd.img", "rootfs": f"{out}/rootfs.qcow2",
            "cmdline": open(f"{out}/cmdline").read().strip(), "boot": f"{out}/boot.qcow2"}


@pytest.fixture(scope="session")
def vm_root():
    """A session directory QEMU (user libvirt-qemu) can reach: pytest's tmp_path lives under
    a 0700 directory, so VM disks, seeds and console logs go here instead."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="nodeagent-vmtest-", dir="/var/tmp")
    import os
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vm_dir(vm_root, request):
    """A per-test directory under vm_root."""
    import os
    import re
    d = os.path.join(vm_root, re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60])
    os.makedirs(d, mode=0o755, exist_ok=True)
    return d
