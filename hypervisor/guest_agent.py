"""A libvirt VM's guest agent, asked to freeze the guest's filesystems around a snapshot.

Terms: the *guest agent* is whatever program in the guest serves the QEMU guest agent
protocol on the virtio-serial port ``org.qemu.guest_agent.0`` (domain_xml gives every VM that
port). libvirt is its only client on the host: it connects to the port's socket, and
reports in the live domain XML whether the guest has the port open
(``<target ... state='connected'>``, the same fact as VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE).

Trust: the guest belongs to a tenant, so whatever it says on that port is hostile input.
libvirt parses it (a bounded buffer, JSON); we call only ``fsFreeze``/``fsThaw`` and use no
more of the answer than "it froze" (the count goes to the log). Every call is bounded:
before asking, the domain's agent response timeout is set to AGENT_TIMEOUT_S, which also
bounds libvirt's guest-sync handshake. So:

- no agent (the port is not open, or the VM predates the channel): nothing is asked, the
  snapshot is crash-consistent with no added wait;
- an agent that answers: freeze, the caller's one short step (the QMP transaction), thaw;
- an agent that is silent, slow, or answers garbage or an error: at most two bounded
  waits (freeze, thaw), then the snapshot goes on crash-consistent. Thaw is always asked
  once a freeze was asked (also when the freeze timed out: a late freeze must not leave
  the guest frozen), and also when the caller's step raised.
"""
from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from hypervisor.domain_xml import GUEST_AGENT_CHANNEL

log = logging.getLogger(__name__)

# seconds libvirt waits for each answer of the guest agent (guest-sync, then the command):
# a live agent answers in milliseconds, even under TCG; a guest that does not is not waited for
AGENT_TIMEOUT_S = 2


def connected(root: ET.Element) -> bool:
    """True if the running domain's live XML ``root`` shows a guest holding its agent port open."""
    for ch in root.findall("devices/channel"):
        t = ch.find("target")
        if t is not None and t.get("type") == "virtio" and t.get("name") == GUEST_AGENT_CHANNEL:
            return t.get("state") == "connected"
    return False


# what a call to the guest agent may raise: libvirtError, and SystemError (with a
# UnicodeDecodeError under it) when libvirt's error message quotes bytes the guest sent that are
# not UTF-8, which the Python binding cannot decode (seen with a guest answering 0xff)
AGENT_ERRORS = (libvirt.libvirtError, SystemError, UnicodeError)


def _message(e: Exception) -> str:
    """The error for the log: the guest may have chosen part of it (libvirt quotes the agent's
    error "desc"), so it is cut short and stripped of newlines and control characters."""
    msg = (e.get_error_message() if isinstance(e, libvirt.libvirtError) else None) or f"{type(e).__name__}: {e}"
    return "".join(c if c.isprintable() else "?" for c in msg[:300])


@contextmanager
def frozen(dom: libvirt.virDomain, root: ET.Element, name: str) -> Iterator[bool]:
    """Freeze running domain ``dom``'s filesystems (``root``: its live XML) for the with-block;
    yields whether they are frozen. Never raises for the guest's behaviour (see the module)."""
    if not connected(root) or not bounded(dom, name):
        yield False
        return
    t0 = time.monotonic()
    ok = False
    try:
        try:
            n = dom.fsFreeze(None, 0)
            ok, t1 = True, time.monotonic()
            log.info("guest agent froze filesystems", extra={"vm": name, "filesystems": n,
                                                              "freeze_ms": round((t1 - t0) * 1000, 1)})
        except AGENT_ERRORS as e:
            log.warning("guest agent did not freeze its filesystems: snapshot is crash-consistent",
                        extra={"vm": name, "error": _message(e)})
        yield ok
    finally:
        thaw(dom, name)
        if ok:  # frozen_ms: from the freeze's answer to the thaw's (the guest's frozen window, about)
            log.info("guest filesystems thawed", extra={"vm": name,
                                                         "frozen_ms": round((time.monotonic() - t1) * 1000, 1)})


def bounded(dom: libvirt.virDomain, name: str) -> bool:
    """Set the domain's agent response timeout to AGENT_TIMEOUT_S; False if libvirt refused
    (then the agent must not be asked: libvirt's default is to wait for it forever)."""
    try:
        dom.agentSetResponseTimeout(AGENT_TIMEOUT_S, 0)
        return True
    except AGENT_ERRORS as e:
        log.warning("cannot bound the guest agent's answers: it is not asked", extra={"vm": name,
                                                                                     "error": _message(e)})
        return False


def thaw(dom: libvirt.virDomain, name: str) -> bool:
    """Ask the guest agent to thaw (bounded as above); False if it did not confirm."""
    try:
        dom.fsThaw(None, 0)
        return True
    except AGENT_ERRORS as e:
        log.warning("guest agent did not confirm the thaw", extra={"vm": name, "error": _message(e)})
        return False
