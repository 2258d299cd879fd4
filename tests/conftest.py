"""Shared fixtures. Real components are started by session fixtures in the suites that
need them; a missing component fails the test with what the machine lacks."""
from __future__ import annotations

import pytest

from agent.state import Database


@pytest.fixture
def db(tmp_path):
    d = Database(tmp_path / "state.db")
    yield d
    d.close()


@pytest.fixture(scope="session")
def libvirtd():
    """libvirtd + virtlogd serving qemu:///system; the URI. Started here (and stopped by
    PID at session end) only if none is running."""
    from tests import libvirt_daemon
    try:
        daemons = libvirt_daemon.ensure()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield daemons.uri
    daemons.stop()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """A docker-registry on 127.0.0.1:<free port> (tests/registry_server.py); stopped by PID."""
    from tests.registry_server import RegistryServer
    server = RegistryServer(str(tmp_path_factory.mktemp("registry"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def busybox_ref(oci_registry, tmp_path_factory):
    """Reference of a busybox image built by the tests and pushed to ``oci_registry``."""
    from tests.registry_server import push_busybox
    return push_busybox(oci_registry, str(tmp_path_factory.mktemp("busybox-image")))
