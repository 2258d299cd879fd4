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
def ceph():
    """A live single-node Ceph (scripts/ceph-dev-cluster) for the session: a CephEnv.
    NODEAGENT_CEPH_DIR=<dir of a running cluster> reuses one (and leaves it running)."""
    from tests import ceph_cluster

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
    from tests import libvirt_daemon
    try:
        daemons = libvirt_daemon.ensure()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield daemons.uri
    daemons.stop()
