"""A real VM guest (TCG, the test guest) on the filtered bridge: its tap carries the name
its rules are keyed by (``<target dev>``), its own traffic passes the anti-spoofing rules
(it answers ARP and ping from its leased address), and the security groups decide who
reaches it, live. The test guest runs no commands of ours (its init only reports), so the
attacker here is a tenant's network namespace attached the way a container's is."""
from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from agent.services.assembly import tap_for
from containers.firewall import Policy
from containers.network import Network
from tests.functional.test_vms import lv, pool, seed_dir, store, vms, wait_console  # noqa: F401 - fixtures

pytestmark = pytest.mark.real


def pings(ns: str, ip: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "/bin/busybox", "ping", "-c", "1", "-W", "2", ip],
                          capture_output=True).returncode == 0


def test_a_vm_behind_its_tap_rules_and_groups(lv, vms, db, request):  # noqa: F811
    bridge = f"natvm{secrets.token_hex(3)}"
    net = Network(db, bridge=bridge, subnet=f"198.19.{secrets.randbelow(40) + 60}.0/24", nat=False,
                  rtag=secrets.token_hex(2))
    members: dict[str, tuple[str, ...]] = {}
    net.policy_source = lambda: Policy("same-group", {"guests": (), "others": ()}, dict(members))

    def cleanup():
        net.detach("tenant")
        net.delete_bridge()
    request.addfinalizer(cleanup)
    vm = vms(network=net)
    members["vm:" + vm.id] = ("guests",)
    members["tenant"] = ("others",)
    net.apply_firewall()
    tap = tap_for(vm.id)
    listing = net.firewall.listing()
    assert f'"{tap}" . ' in listing and f"{vm.ip} : jump in_" in listing
    assert lv.start(vm.name).state == "running"
    assert tap in os.listdir(f"/sys/class/net/{bridge}/brif")  # the tap has the name its rules use
    wait_console(lv, vm.name, "NODEAGENT-READY")
    ns = net.netns_name("tenant")
    net.attach("tenant")
    # another group, no rule: the guest is out of reach
    assert not pings(ns, vm.ip)
    # the same group (live): its replies from its own MAC and address pass its tap's rules
    members["tenant"] = ("others", "guests")
    net.apply_firewall()
    assert pings(ns, vm.ip)
    # deleted: nothing of it is left in the tables
    lv.delete(vm.name)
    from agent.services.assembly import Assembly
    Assembly(None, net, bridge=bridge, instances_dir="/nonexistent").release_address(vm.id)
    assert tap not in net.firewall.listing()
