"""A VM defined before the tenant filter existed (a lease without MAC or port, a NIC without
``<target dev>``: libvirt names its tap vnetN at each start) gets its anti-spoofing and
security-group rules keyed to the tap it runs on (Assembly.sync_vm_port), on the fake driver
and the host's real nft (tables of this test's own rtag)."""
from __future__ import annotations

import secrets
import subprocess
import uuid

import pytest

from agent.services.assembly import Assembly, mac_for, tap_for
from containers.firewall import Policy
from containers.network import VM_LEASE_PREFIX, Network
from hypervisor.driver import DiskSpec, NicSpec, VmSpec
from hypervisor.fake import FakeDriver
from testbed import runtimes

pytestmark = pytest.mark.real


@pytest.fixture
def net(db):
    bridge, subnet = runtimes.test_network("nasync")
    rtag = secrets.token_hex(2)
    runtimes.MADE_RTAGS.add(rtag)
    n = Network(db, bridge=bridge, subnet=subnet, nat=False, rtag=rtag)
    n.policy_source = lambda: Policy(members={})
    yield n
    runtimes.drop_test_network(bridge, rtag)


def disk(path) -> DiskSpec:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return DiskSpec(target="vda", source=str(path))


def test_an_old_vms_vnet_tap_gets_its_rules(net, tmp_path):
    inst_id = uuid.uuid4().hex
    name = f"old-{inst_id[:6]}"
    lease = VM_LEASE_PREFIX + inst_id
    ip = net.lease(lease)  # as leased before leases had a MAC and a port
    assert net.ports() == []
    driver = FakeDriver()
    driver.define(VmSpec(name=name, uuid=str(uuid.UUID(inst_id)), cpus=1, memory_mib=128,
                         disks=(disk(tmp_path / "d.qcow2"),),
                         nics=(NicSpec(bridge=net.bridge, mac=mac_for(inst_id)),)))
    asm = Assembly(None, net, bridge=net.bridge, instances_dir=tmp_path / "instances")
    assert not asm.sync_vm_port(driver, inst_id, name), "stopped: no tap to key"
    driver.start(name)
    assert asm.sync_vm_port(driver, inst_id, name)
    (port,) = net.ports()
    assert (port.ifname, port.mac, port.ip) == ("vnet0", mac_for(inst_id), ip)
    listing = net.firewall.listing()
    assert f'"vnet0" . {mac_for(inst_id)} . {ip}' in listing  # the port may send as itself
    assert f'"vnet0" . {ip}' in listing
    assert not asm.sync_vm_port(driver, inst_id, name), "keyed already: nothing to do"

    # a VM of today (its tap named in its definition) is keyed so from its lease on
    new_id = uuid.uuid4().hex
    net.lease(VM_LEASE_PREFIX + new_id, mac=mac_for(new_id), ifname=tap_for(new_id))
    driver.define(VmSpec(name="new", uuid=str(uuid.UUID(new_id)), cpus=1, memory_mib=128,
                         disks=(disk(tmp_path / "e.qcow2"),),
                         nics=(NicSpec(bridge=net.bridge, mac=mac_for(new_id), target=tap_for(new_id)),)))
    driver.start("new")
    assert not asm.sync_vm_port(driver, new_id, "new")
    assert f'"{tap_for(new_id)}" . {mac_for(new_id)} . ' in net.firewall.listing()
    # a VM without an address (no lease): nothing
    assert not asm.sync_vm_port(driver, uuid.uuid4().hex, "new")
