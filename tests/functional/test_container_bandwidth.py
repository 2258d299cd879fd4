"""Real runc containers sending past their bandwidth limits are held; the same traffic
without limits is not; a live change takes effect. Shape-based: the limited rate is far
below what the same pair moves unlimited, never an exact figure."""
from __future__ import annotations

import threading

import pytest

from containers import NetworkSpec
from containers import bandwidth
from containers.bandwidth import Bandwidth
from testbed.runtimes import make_runc, make_spec

pytestmark = pytest.mark.real

LIMIT_KBIT = 8000  # 8 Mbit/s: 1 MB/s
WINDOW = 2  # seconds the receiver counts for
PORT = 5001


@pytest.fixture
def rt(tmp_path):
    runtime, cleanup = make_runc(tmp_path)
    yield runtime
    cleanup()
    assert bandwidth.sweep() == []  # delete removed every ifb it made


def start(rt, tmp_path, name, bw=Bandwidth()):
    rt.create(make_spec(rt, tmp_path, name, ("sleep", "1000"), network=NetworkSpec(mode="bridge"),
                        bandwidth=bw))
    return rt.start(name)


def transfer_kbit(rt, sender: str, receiver: str) -> float:
    """kbit/s the receiver got from a sender pushing as fast as it can for WINDOW seconds."""
    ip = rt.get(receiver).ip
    got = {}

    def receive():
        # busybox nc ends at EOF on its stdin: feed it one that stays open past the timeout
        got["res"] = rt.exec(receiver, ["sh", "-c", f"sleep {WINDOW + 2} | busybox timeout {WINDOW + 1} "
                                                    f"nc -l -p {PORT} | wc -c"], timeout=30)
    t = threading.Thread(target=receive)
    t.start()
    rt.exec(sender, ["sh", "-c", f"sleep 0.5; busybox timeout {WINDOW} sh -c "
                                 f"'cat /dev/zero | nc {ip} {PORT}'; true"], timeout=30)
    t.join(30)
    res = got["res"]
    assert res.exit_code == 0, res
    return int(res.stdout.strip()) * 8 / 1000 / WINDOW


def test_egress_and_ingress_limits_hold_and_change_live(rt, tmp_path):
    start(rt, tmp_path, "limited", Bandwidth(egress_kbit=LIMIT_KBIT))
    start(rt, tmp_path, "free")
    start(rt, tmp_path, "sink", Bandwidth(ingress_kbit=LIMIT_KBIT))
    port = rt.net.veth_name("limited")
    assert bandwidth.read(port) == {"ingress_kbit": None, "egress_kbit": LIMIT_KBIT}
    held = transfer_kbit(rt, "limited", "free")  # the sender's egress limit
    assert 0 < held < 4 * LIMIT_KBIT, held
    unlimited = transfer_kbit(rt, "free", "limited")  # the same pair, the other way: no limit
    assert unlimited > 4 * LIMIT_KBIT and unlimited > 4 * held, (held, unlimited)
    into = transfer_kbit(rt, "free", "sink")  # the receiver's ingress limit
    assert 0 < into < 4 * LIMIT_KBIT, into
    # live: lift the sender's limit, then set a lower one
    rt.set_bandwidth("limited", Bandwidth())
    assert bandwidth.read(port) == {"ingress_kbit": None, "egress_kbit": None}
    assert transfer_kbit(rt, "limited", "free") > 4 * LIMIT_KBIT
    rt.set_bandwidth("limited", Bandwidth(egress_kbit=LIMIT_KBIT // 4, ingress_kbit=LIMIT_KBIT))
    assert bandwidth.read(port) == {"ingress_kbit": LIMIT_KBIT, "egress_kbit": LIMIT_KBIT // 4}
    assert 0 < transfer_kbit(rt, "limited", "free") < LIMIT_KBIT


def test_limits_survive_a_restart_and_a_reboot_and_go_with_the_container(rt, tmp_path):
    start(rt, tmp_path, "keep", Bandwidth(ingress_kbit=2000, egress_kbit=1000))
    port, ifb = rt.net.veth_name("keep"), bandwidth.ifb_name(rt.net.veth_name("keep"))
    rt.restart("keep", timeout=1)
    assert bandwidth.read(port) == {"ingress_kbit": 2000, "egress_kbit": 1000}
    # a host reboot: veth, netns and ifb are gone; the next start makes them again
    rt.stop("keep", timeout=1)
    rt.net.detach("keep", keep_lease=True)
    assert bandwidth.sweep() == [ifb]
    rt.start("keep")
    assert bandwidth.read(port) == {"ingress_kbit": 2000, "egress_kbit": 1000}
    rt.delete("keep")
    assert not bandwidth.port_exists(ifb)


def test_a_container_with_net_admin_cannot_lift_its_own_limit(rt, tmp_path):
    # the shaping sits on the host's side of the veth: whatever root in the container does to
    # its own interface (even granted CAP_NET_ADMIN), it is still held
    rt.create(make_spec(rt, tmp_path, "escaper", ("sleep", "1000"), network=NetworkSpec(mode="bridge"),
                        bandwidth=Bandwidth(egress_kbit=LIMIT_KBIT), cap_add=("CAP_NET_ADMIN",)))
    rt.start("escaper")
    start(rt, tmp_path, "peer")
    tries = ["busybox tc qdisc del dev eth0 root", "busybox tc qdisc del dev eth0 ingress",
             "ip link set eth0 txqueuelen 100000", "ip link set eth0 mtu 9000"]
    for cmd in tries:
        rt.exec("escaper", ["sh", "-c", cmd])
    assert rt.exec("escaper", ["ip", "link", "show", "nv" + rt.rtag]).exit_code != 0  # the host side is not in reach
    held = transfer_kbit(rt, "escaper", "peer")
    assert 0 < held < 4 * LIMIT_KBIT, held
    assert bandwidth.read(rt.net.veth_name("escaper"))["egress_kbit"] == LIMIT_KBIT


def test_a_user_namespaced_container_is_shaped_on_each_new_veth():
    import os
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="nodeagent-userns-bw-", dir="/tmp")
    os.chmod(d, 0o711)  # container root (an unprivileged host uid) must traverse it
    from pathlib import Path
    rt, cleanup = make_runc(Path(d))
    try:
        rt.create(make_spec(rt, Path(d), "u", ("sleep", "1000"), userns=True, network=NetworkSpec(mode="bridge"),
                            bandwidth=Bandwidth(ingress_kbit=3000, egress_kbit=2000)))
        rt.start("u")
        port = rt.net.veth_name("u")
        assert bandwidth.read(port) == {"ingress_kbit": 3000, "egress_kbit": 2000}
        rt.restart("u", timeout=0.5)  # runc makes a new netns, so a new veth: shaped again
        assert bandwidth.read(port) == {"ingress_kbit": 3000, "egress_kbit": 2000}
        rt.set_bandwidth("u", Bandwidth(ingress_kbit=1000))
        assert bandwidth.read(port) == {"ingress_kbit": 1000, "egress_kbit": None}
    finally:
        cleanup()
        shutil.rmtree(d, ignore_errors=True)
    assert bandwidth.sweep() == []
