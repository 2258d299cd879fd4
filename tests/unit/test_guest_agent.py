"""hypervisor.guest_agent against a stub domain that injects what a hostile or absent guest
agent does to libvirt's calls (the real path: tests/api/test_snapshots_real.py)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from hypervisor import guest_agent


def _root(state: str | None, name: str = "org.qemu.guest_agent.0") -> ET.Element:
    st = f" state='{state}'" if state else ""
    return ET.fromstring(f"<domain><devices><channel type='unix'><target type='virtio' name='{name}'{st}/>"
                         "</channel></devices></domain>")


class StubDom:
    """Records the agent calls; ``freeze`` is what fsFreeze does (a count or an exception)."""

    def __init__(self, freeze=1, timeout_error=None):
        self.calls: list[str] = []
        self.freeze, self.timeout_error = freeze, timeout_error

    def agentSetResponseTimeout(self, seconds, flags):
        self.calls.append(f"timeout {seconds}")
        if self.timeout_error:
            raise self.timeout_error

    def fsFreeze(self, mountpoints, flags):
        self.calls.append("freeze")
        if isinstance(self.freeze, BaseException):
            raise self.freeze
        return self.freeze

    def fsThaw(self, mountpoints, flags):
        self.calls.append("thaw")
        return 1


def _error(msg: str) -> libvirt.libvirtError:
    return libvirt.libvirtError(msg)


def test_connected_reads_the_agent_port_state():
    assert guest_agent.connected(_root("connected"))
    assert not guest_agent.connected(_root("disconnected"))
    assert not guest_agent.connected(_root(None))
    assert not guest_agent.connected(_root("connected", name="org.example.other"))
    assert not guest_agent.connected(ET.fromstring("<domain><devices/></domain>"))


def test_no_agent_connected_asks_nothing():
    dom = StubDom()
    with guest_agent.frozen(dom, _root("disconnected"), "vm") as fs:
        assert fs is False
    assert dom.calls == []


def test_an_answering_agent_is_bounded_frozen_and_thawed():
    dom = StubDom()
    with guest_agent.frozen(dom, _root("connected"), "vm") as fs:
        assert fs is True
        assert dom.calls == [f"timeout {guest_agent.AGENT_TIMEOUT_S}", "freeze"]
    assert dom.calls[-1] == "thaw"


@pytest.mark.parametrize("fault", [
    _error("Guest agent is not responding: Guest agent not available for now"),  # silent: timed out
    SystemError("<built-in function virDomainFSFreeze> returned a result with an exception set"),  # non-UTF-8
    _error("internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze'"),
])
def test_a_failing_agent_is_not_trusted_and_still_thawed(fault):
    dom = StubDom(freeze=fault)
    with guest_agent.frozen(dom, _root("connected"), "vm") as fs:
        assert fs is False
    assert dom.calls[-2:] == ["freeze", "thaw"], "a late freeze must not leave the guest frozen"


def test_thawed_also_when_the_snapshot_fails():
    dom = StubDom()
    with pytest.raises(RuntimeError):
        with guest_agent.frozen(dom, _root("connected"), "vm"):
            raise RuntimeError("the QMP transaction failed")
    assert dom.calls[-1] == "thaw"


def test_without_a_bounded_timeout_the_agent_is_not_asked():
    dom = StubDom(timeout_error=_error("this function is not supported"))
    with guest_agent.frozen(dom, _root("connected"), "vm") as fs:
        assert fs is False
    assert "freeze" not in dom.calls


def test_what_the_guest_says_reaches_the_log_defanged(caplog):
    forged = _error("unable to execute QEMU agent command 'guest-fsfreeze-freeze': x\n2026 INFO forged line\x1b[2J"
                    + "y" * 1000)
    dom = StubDom(freeze=forged)
    with guest_agent.frozen(dom, _root("connected"), "vm") as fs:
        assert fs is False
    err = next(r.error for r in caplog.records if hasattr(r, "error"))
    assert "\n" not in err and "\x1b" not in err and len(err) <= 300
