"""containers.network bookkeeping (DB only: leases and port claims) and log parsing."""
from __future__ import annotations

import socket
import threading
import time

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


def test_an_address_another_network_object_released_is_leased_again(db):
    """The free-address search starts where it last found one (no read of every lease per
    create); an address freed behind its back is found when the search wraps around."""
    n, other = net(db), net(db)
    assert [n.lease(f"c{i}") for i in range(5)][-1] == "198.19.77.6"
    assert other.release("c1")
    assert n.lease("c5") == "198.19.77.3"
    with pytest.raises(InsufficientResources):
        n.lease("c6")


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


class _RecordingFirewall:
    """Records the ports of each rebuild; the first one blocks until ``gate`` (and fails with ``fail``)."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[list[str]] = []
        self.gate, self.fail = threading.Event(), fail

    def apply(self, ports, policy):
        first = not self.calls
        self.calls.append(sorted(p.owner for p in ports))
        if first:
            assert self.gate.wait(10)
            if self.fail:
                raise self.fail


def _lease_in_threads(n, names, errors):
    def one(name):
        try:
            n._lease(name, None, n.container_mac(name), n.veth_name(name))
            n.apply_firewall()
            assert name in fw.calls[-1], "returned before a rebuild with its lease was applied"
        except Exception as e:  # noqa: BLE001 - the test reads them
            errors[name] = e
    fw = n.firewall
    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for t in threads:
        t.start()
    return threads


def _wait_asked(n, count):
    for _ in range(500):
        if n._fw_asked >= count:
            return
        time.sleep(0.01)
    raise AssertionError("the callers never asked for a rebuild")


def test_concurrent_firewall_rebuilds_are_shared(db):
    """A create storm: the callers waiting during one rebuild share the next one, and each
    returns only once a rebuild that includes its own lease is applied."""
    n = net(db, subnet="198.19.77.0/28")
    n.firewall = fw = _RecordingFirewall()
    errors: dict = {}
    first = _lease_in_threads(n, ["c0"], errors)
    _wait_asked(n, 1)
    rest = _lease_in_threads(n, [f"c{i}" for i in range(1, 8)], errors)
    _wait_asked(n, 8)
    fw.gate.set()
    for t in first + rest:
        t.join(10)
    assert not errors
    assert len(fw.calls) == 2, fw.calls  # not 8
    assert fw.calls[-1] == sorted(f"c{i}" for i in range(8))
    n.apply_firewall()  # a lone call after them still rebuilds
    assert len(fw.calls) == 3


def test_a_failed_shared_rebuild_is_retried_by_each_waiting_caller(db):
    n = net(db, subnet="198.19.77.0/28")
    n.firewall = fw = _RecordingFirewall(fail=RuntimeError("nft refused"))
    errors: dict = {}
    first = _lease_in_threads(n, ["c0"], errors)
    _wait_asked(n, 1)
    second = _lease_in_threads(n, ["c1"], errors)
    _wait_asked(n, 2)
    fw.gate.set()
    for t in first + second:
        t.join(10)
    assert set(errors) == {"c0"} and "nft refused" in str(errors["c0"])  # reserve() would release it
    assert len(fw.calls) == 2 and "c1" in fw.calls[-1]


def test_veth_counters_are_read_from_sysfs_reversed(db, tmp_path, monkeypatch):
    """The container's rx is its host veth's tx; no veth (not running): zeros."""
    import containers.network as network
    monkeypatch.setattr(network, "SYS_NET", str(tmp_path))
    n = net(db)
    st = tmp_path / n.veth_name("c0") / "statistics"
    st.mkdir(parents=True)
    for key, v in {"rx_bytes": 10, "tx_bytes": 20, "rx_packets": 1, "tx_packets": 2}.items():
        (st / key).write_text(f"{v}\n")
    assert n.counters("c0") == {"rx_bytes": 20, "tx_bytes": 10, "rx_packets": 2, "tx_packets": 1}
    assert n.counters("c1") == {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}


def test_the_key_quota_is_raised_never_lowered(tmp_path):
    """runc gives each container a session keyring charged to the uid its root maps to: the
    kernel's default quota for a non-root uid (200 keys) would stop creates at ~200."""
    from containers.runc import KEY_QUOTA, ensure_key_quota
    (tmp_path / "maxkeys").write_text("200\n")
    (tmp_path / "maxbytes").write_text("99999999\n")
    assert ensure_key_quota(str(tmp_path)) == {"maxkeys": KEY_QUOTA["maxkeys"]}
    assert int((tmp_path / "maxkeys").read_text()) == KEY_QUOTA["maxkeys"]
    assert (tmp_path / "maxbytes").read_text() == "99999999\n"
    assert ensure_key_quota(str(tmp_path)) == {}
    (tmp_path / "maxbytes").unlink()  # unreadable: logged, the rest still done
    (tmp_path / "maxkeys").write_text("10\n")
    assert ensure_key_quota(str(tmp_path)) == {"maxkeys": KEY_QUOTA["maxkeys"]}


def test_leftover_veths_are_ours_without_a_container(db, monkeypatch):
    """The names come from the agent's own network namespace (if_nameindex), whatever sysfs shows."""
    import socket
    n = net(db)
    links = [(1, "lo"), (2, n.veth_name("live")), (3, n.veth_name("gone")), (4, "nvffff0000000"), (5, "eth0")]
    monkeypatch.setattr(socket, "if_nameindex", lambda: links)
    assert n.leftover_veths({"live"}) == [n.veth_name("gone")]


def test_counters_of_reads_every_veth_from_one_file(db, tmp_path, monkeypatch):
    """counters_of: /proc/self/net/dev's host-veth figures turned to the container's view (the
    veth's receive is the container's transmit); a name without a veth gets zeros."""
    import containers.network as network
    n = net(db)
    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls"
        " carrier compressed\n"
        "    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0"
        "       0          0\n"
        f"{n.veth_name('web')}:    1500      12    0    0    0     0          0         0      900       7    0"
        "    0    0     0       0          0\n")
    monkeypatch.setattr(network, "PROC_NET_DEV", str(dev))
    assert n.counters_of(["web", "gone"]) == {
        "web": {"rx_bytes": 900, "tx_bytes": 1500, "rx_packets": 7, "tx_packets": 12},
        "gone": {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}}
