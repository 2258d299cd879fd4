"""containers.network bookkeeping (DB only: leases and port claims) and log parsing."""
from __future__ import annotations

import socket

import pytest

from agent.errors import Conflict, InsufficientResources
from containers import PortMap
from containers.network import Network
from containers.runc import _parse_k8s_log


def net(db, subnet="198.19.77.0/29"):
    return Network(db, bridge="natstunit0", subnet=subnet, nat=False, rtag="abcd")


def test_leases_are_stable_reused_and_bounded(db):
    n = net(db)
    ips = [n.lease(f"c{i}") for i in range(5)]  # /29: .1 is the gateway, .2-.6 usable
    assert ips == [f"198.19.77.{i}" for i in range(2, 7)]
    assert n.lease("c0") == ips[0]  # same name, same address
    with pytest.raises(InsufficientResources, match="larger subnet"):
        n.lease("c5")
    assert n.release("c2") and not n.release("c2")
    assert n.lease("c5") == "198.19.77.4"
    assert n.find_lease("c5") == "198.19.77.4" and n.find_lease("c2") is None


def test_a_wanted_address_is_kept_when_free_and_in_the_subnet(db):
    """A VM arriving from another host asks for the address it had there."""
    n = net(db)
    assert n.lease("vm:a", want="198.19.77.5") == "198.19.77.5"
    assert n.lease("vm:b", want="198.19.77.5") == "198.19.77.2"  # taken: the first free one
    assert n.lease("vm:c", want="198.19.77.1") == "198.19.77.3"  # the gateway is never leased
    assert n.lease("vm:d", want="10.0.0.9") == "198.19.77.4"  # another subnet's address
    assert n.leftover_names() == set(), "VM leases are not container leftovers"


def test_port_claims_conflict_on_ours_and_on_the_hosts(db):
    n = net(db)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(Conflict, match="in use on this host"):
            n.claim_ports("a", (PortMap(busy, 80),))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    n.claim_ports("a", (PortMap(free, 80),))
    n.claim_ports("a", (PortMap(free, 80),))  # idempotent for its owner
    with pytest.raises(Conflict, match="published by container 'a'"):
        n.claim_ports("b", (PortMap(free, 81),))
    with pytest.raises(Conflict):
        n.claim_ports("b", (PortMap(free, 81, host_ip="0.0.0.0"),))
    n.claim_ports("b", (PortMap(free, 81, protocol="udp"),))  # another protocol is free
    with pytest.raises(Conflict, match="not an address of this host"):
        n.claim_ports("c", (PortMap(free, 80, host_ip="203.0.113.9"),))
    assert n.release("a")
    n.claim_ports("b", (PortMap(free, 81),))


def test_names_fit_the_kernel_limits(db):
    n = net(db)
    name = "x" * 63
    assert len(n.veth_name(name)) <= 15 and n.veth_name(name) != n.veth_name("y" * 63)
    assert n.netns_name("c1") == "nact-abcd-c1"


def test_k8s_log_lines_and_partial_lines():
    raw = ("2026-01-01T00:00:00.1+00:00 stdout F hello\n"
           "2026-01-01T00:00:00.2+00:00 stderr P par\n"
           "2026-01-01T00:00:00.3+00:00 stderr F tial\n"
           "2026-01-01T00:00:00.4+00:00 stdout F \n")
    assert _parse_k8s_log(raw) == "hello\npartial\n\n"
