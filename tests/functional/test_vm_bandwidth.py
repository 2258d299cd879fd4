"""VM bandwidth limits on real libvirtd + QEMU: kept in the domain's metadata (stopped or
running, so a migration carries them), applied to the tap at every start, changed live,
and nothing (ifb, qdisc) left when the VM stops or goes."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from containers import bandwidth
from containers.bandwidth import Bandwidth
from containers.network import Network
from hypervisor.domain_xml import BANDWIDTH_NS, taps
from tests.functional.test_vms import bridge, lv, pool, seed_dir, store, vms  # noqa: F401 - fixtures

pytestmark = pytest.mark.real


def test_limits_follow_the_vm_through_its_life(lv, vms, bridge, db, request):  # noqa: F811
    from testbed.runtimes import test_network, test_rtag
    net = Network(db, bridge=bridge, subnet=test_network()[1], nat=False, rtag=test_rtag())
    request.addfinalizer(net.delete_bridge)
    vm = vms(network=net)
    dom = libvirt.open(lv.uri).lookupByName(vm.name)
    lv.set_bandwidth(vm.name, Bandwidth(ingress_kbit=8000, egress_kbit=4000))  # stopped: kept for the start
    meta = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find(f"metadata/{{{BANDWIDTH_NS}}}bandwidth")
    assert meta is not None and meta.get("ingress_kbit") == "8000" and meta.get("egress_kbit") == "4000"
    assert lv.spec(vm.name).bandwidth == Bandwidth(8000, 4000)
    assert lv.start(vm.name).state == "running"
    (tap,) = taps(ET.fromstring(dom.XMLDesc(0)))
    assert bandwidth.read(tap) == {"ingress_kbit": 8000, "egress_kbit": 4000}
    # live: change, then lift one direction
    lv.set_bandwidth(vm.name, Bandwidth(ingress_kbit=2000, burst_kbit=256))
    assert bandwidth.read(tap) == {"ingress_kbit": 2000, "egress_kbit": None}
    assert not bandwidth.port_exists(bandwidth.ifb_name(tap))
    assert lv.bandwidth(vm.name) == Bandwidth(2000, None, 256)  # persistent too
    lv.set_bandwidth(vm.name, Bandwidth(egress_kbit=1000))
    ifb = bandwidth.ifb_name(tap)
    assert bandwidth.port_exists(ifb)
    # stop: the tap goes, and its ifb with it; start: a new tap, shaped again
    lv.stop(vm.name, force=True)
    assert not bandwidth.port_exists(ifb)
    lv.start(vm.name)
    (tap2,) = taps(ET.fromstring(dom.XMLDesc(0)))
    assert bandwidth.read(tap2) == {"ingress_kbit": None, "egress_kbit": 1000}
    with pytest.raises(Exception, match="egress_kbit"):
        lv.set_bandwidth(vm.name, Bandwidth(egress_kbit=5))
    lv.set_bandwidth(vm.name, Bandwidth())
    assert bandwidth.read(tap2) == {"ingress_kbit": None, "egress_kbit": None}
    assert ET.fromstring(dom.XMLDesc(0)).find(f"metadata/{{{BANDWIDTH_NS}}}bandwidth") is None
    lv.set_bandwidth(vm.name, Bandwidth(egress_kbit=1000))
    ifb2 = bandwidth.ifb_name(tap2)
    lv.delete(vm.name)
    assert not bandwidth.port_exists(ifb2)
