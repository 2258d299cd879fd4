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
