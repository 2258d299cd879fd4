"""What makes the agent a good systemd service and a good citizen on a host without one:
sd_notify readiness (agent.sdnotify), the monitors' own scopes (containers.runc), and
starting libvirt's daemons when they are down (agent.hostdaemons, with a fake presence
check: the machine's libvirtd is never stopped for this)."""
from __future__ import annotations

import json
import os
import socket

import pytest

from agent import hostdaemons, sdnotify
from agent.errors import Unavailable
from containers import runc


def test_notify_sends_datagrams_and_takes_the_variable_out_of_the_environment(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        env = {"NOTIFY_SOCKET": path, "PATH": "/bin"}
        sock = sdnotify.take_socket(env)
        assert sock == path and "NOTIFY_SOCKET" not in env  # runc must not inherit it
        assert sdnotify.notify(sock, "READY=1")
        assert srv.recv(100) == b"READY=1"
        assert sdnotify.notify(sock, "STOPPING=1")
        assert srv.recv(100) == b"STOPPING=1"


def test_notify_in_the_abstract_namespace():
    name = f"nodeagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        assert sdnotify.notify(sdnotify.take_socket({"NOTIFY_SOCKET": "@" + name}), "READY=1")
        assert srv.recv(100) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "/nonexistent/notify"])
def test_notify_without_a_usable_socket_does_nothing(value):
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert sdnotify.notify(sdnotify.take_socket(env), "READY=1") is False
    assert "NOTIFY_SOCKET" not in env


def test_monitor_scope_argv():
    assert runc.monitor_scope_argv("web", None) == []
    argv = runc.monitor_scope_argv("web", "/usr/bin/systemd-run")
    assert argv[:3] == ["/usr/bin/systemd-run", "--scope", "--quiet"]
    unit = next(a for a in argv if a.startswith("--unit="))[len("--unit="):]
    assert unit.startswith("nodeagent-conmon-web-") and unit != next(
        a for a in runc.monitor_scope_argv("web", "/usr/bin/systemd-run") if a.startswith("--unit="))[7:]


def test_systemd_booted(tmp_path):
    assert not runc.systemd_booted(str(tmp_path / "absent"))
    assert runc.systemd_booted(str(tmp_path)) and hostdaemons.systemd_booted(str(tmp_path))


@pytest.mark.parametrize("driver, uri, systemd, expected", [
    ("libvirt", "qemu:///system", False, True),
    ("libvirt", "qemu:///system", True, False),     # systemd starts libvirtd.service
    ("fake", "qemu:///system", False, False),       # no VMs through libvirt
    ("libvirt", "qemu+tcp://elsewhere/system", False, False),  # not this host's daemons
])
def test_wanted(driver, uri, systemd, expected):
    assert hostdaemons.wanted(driver, uri, systemd=systemd) is expected


def test_ensure_starts_only_the_absent_daemons_in_order_and_records_them(tmp_path):
    up = {"/run/libvirt/virtlogd-sock"}
    started = []

    def start(d):
        started.append(d.name)
        return 4242
    got = hostdaemons.ensure(str(tmp_path), answers=lambda s: s in up, start=start)
    assert got == {"libvirtd": 4242} and started == ["libvirtd"]
    assert json.loads((tmp_path / "host-daemons.json").read_text())["started"] == {"libvirtd": 4242}

    started.clear()
    got = hostdaemons.ensure(str(tmp_path / "b"), answers=lambda s: False, start=start)
    assert started == ["virtlogd", "libvirtd"]  # virtlogd first: libvirtd hands it QEMU's console


def test_ensure_with_everything_up_starts_nothing_and_writes_nothing(tmp_path):
    def start(d):
        raise AssertionError(f"started {d.name}")
    assert hostdaemons.ensure(str(tmp_path), answers=lambda s: True, start=start) == {}
    assert not (tmp_path / "host-daemons.json").exists()


def test_ensure_on_this_machine_finds_the_running_libvirtd(tmp_path):
    """The integrator's libvirtd and virtlogd run here: the real presence check sees them
    and nothing is started."""
    if not hostdaemons.socket_answers("/run/libvirt/libvirt-sock"):
        pytest.fail("no libvirtd answers on /run/libvirt/libvirt-sock: start it (`virtlogd -d && libvirtd -d`)")

    def start(d):
        raise AssertionError(f"would start {d.name} although it runs")
    assert hostdaemons.ensure(str(tmp_path), start=start) == {}


def test_a_missing_binary_names_the_package(monkeypatch):
    monkeypatch.setattr(hostdaemons.shutil, "which", lambda name: None)
    monkeypatch.setattr(hostdaemons.os.path, "exists", lambda p: False)
    with pytest.raises(Unavailable, match="apt-get install libvirt-daemon-system"):
        hostdaemons.start_daemon(hostdaemons.Daemon("libvirtd-nonexistent", "/nonexistent", "/nonexistent"))
