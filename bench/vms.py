"""VM benchmarks: JSON lines as described in DESIGN.md section 7.

(a) create through the agent's assembly (agent.services.assembly: image store clone + NoCloud
    seed + define, as POST /v1/instances makes it) + start to QEMU running, p50 over RUNS, against
    `virsh create` of the same domain XML with a pre-made disk and seed;
(b) start to the test guest's marker on its serial console (TCG here), against a bare
    `qemu-system-x86_64` run of the same kernel + initrd;
(c) through the agent's API, POST /v1/instances of the bootable image (boot.qcow2: SeaBIOS,
    syslinux, no direct kernel boot) to the marker in GET /v1/instances/{id}/logs, against
    `virsh create` of the same disk boot with a pre-made overlay and seed to the marker.
Needs root, libvirtd (started here if none runs; stopped by PID after) and the test guest
(scripts/build-test-images). Run as: .venv/bin/python bench/vms.py
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid

from hypervisor.domain_xml import domain_xml
from hypervisor.libvirt_driver import LibvirtDriver
from agent import models
from agent.services.assembly import Assembly, DirectBoot
from agent.state import Database
from hypervisor.seed import make_seed
from jsonline import emitter
from storage import ImageStore
from storage.local import LocalBackend
from testbed import libvirt_daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = 20
BOOT_RUNS = 5
MARKER = "NODEAGENT-GUEST-BOOTED"
BOOT_TIMEOUT_S = 120
API_BOOT_RUNS = 3  # each run boots two guests to their marker (~8 s with the deletes)
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")


line = emitter("vms", digits=1)


def wait_file(path, text, t0, timeout=BOOT_TIMEOUT_S) -> float:
    while True:
        try:
            if text in open(path, errors="replace").read():
                return time.monotonic() - t0
        except FileNotFoundError:
            pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{text} not in {path} after {timeout}s")
        time.sleep(0.01)


def api_boot(uri: str, work: str, virt_type: str) -> None:
    """(c): API create of the bootable image to the guest's marker, against `virsh create`."""
    from hypervisor.driver import DiskSpec, VmSpec
    from testbed.agentproc import AgentProcess, Api

    agent = AgentProcess(f"{work}/agent", pool_kind="local", import_dirs=[IMAGES])
    agent.config.write_text(agent.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{uri}"\n'))
    token = agent.token("bench", "admin")
    agent.start()
    api = Api(agent.url, token)
    ours, peers = [], []
    try:
        op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{IMAGES}/boot.qcow2"}}).json())
        assert op["status"] == "succeeded", op
        for i in range(API_BOOT_RUNS + 1):  # the first run warms caches and is dropped
            name = f"bench-apiboot-{i}"
            t0 = time.monotonic()
            r = api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "boot", "cpus": 1,
                                                "memory_mib": 128, "network": "none"})
            assert r.status_code == 202, r.text
            while MARKER not in api.get(f"/v1/instances/{name}/logs").json().get("logs", ""):
                if time.monotonic() - t0 > BOOT_TIMEOUT_S:
                    raise RuntimeError(f"{MARKER} not on {name}'s console after {BOOT_TIMEOUT_S}s")
                time.sleep(0.01)
            dt = time.monotonic() - t0
            api.delete(f"/v1/instances/{name}")
            peer = f"bench-virshboot-{i}"
            disk = f"{work}/{peer}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{IMAGES}/boot.qcow2",
                            "-F", "qcow2", disk], check=True)
            seed = make_seed(f"{work}/{peer}-seed.iso", instance_id=peer, hostname=peer)
            spec = VmSpec(name=peer, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                          disks=(DiskSpec("vda", disk), DiskSpec("vdz", seed, format="raw", readonly=True)),
                          console_log=f"{work}/{peer}.log")
            xml = f"{work}/{peer}.xml"
            with open(xml, "w") as f:
                f.write(domain_xml(spec, virt_type=virt_type))
            t0 = time.monotonic()
            subprocess.run(["virsh", "-q", "-c", uri, "create", xml], check=True, stdout=subprocess.DEVNULL)
            try:
                pt = wait_file(spec.console_log, MARKER, t0)
            finally:
                subprocess.run(["virsh", "-q", "-c", uri, "destroy", peer], capture_output=True)
            if i:
                ours.append(dt * 1000)
                peers.append(pt * 1000)
    finally:
        for i in range(API_BOOT_RUNS + 1):
            api.delete(f"/v1/instances/bench-apiboot-{i}")
        agent.stop()
    line("api_create_disk_boot_to_guest_marker_p50", statistics.median(ours),
         "virsh create (pre-made overlay + seed), disk boot", statistics.median(peers))


def main() -> None:
    subprocess.run([os.path.join(ROOT, "scripts", "build-test-images"), IMAGES], check=True,
                   stdout=subprocess.DEVNULL)
    kernel, initrd = f"{IMAGES}/vmlinuz", f"{IMAGES}/initrd.img"
    cmdline = open(f"{IMAGES}/cmdline").read().strip()
    daemons = libvirt_daemon.ensure()
    work = tempfile.mkdtemp(prefix="nodeagent-bench-vms-", dir="/var/tmp")
    os.chmod(work, 0o755)
    drv = LibvirtDriver(uri=daemons.uri, virt_type="auto", state_dir=f"{work}/state")
    pool = LocalBackend("bench", f"{work}/pool")
    db = Database(f"{work}/state.db")
    store = ImageStore(db, {"bench": pool}, default_pool="bench", cache_dir=f"{work}/cache")
    image = store.import_file(f"{IMAGES}/rootfs.qcow2", name="rootfs")
    digest = image.digest
    # the agent's assembly (what POST /v1/instances makes), the test guest's kernel booted directly
    asm = Assembly(store, None, bridge="none", instances_dir=f"{work}/instances")
    boot = DirectBoot(kernel, initrd, cmdline)
    names: dict[str, str] = {}  # name -> instance id

    def create_vm(name):
        inst_id = uuid.uuid4().hex
        names[name] = inst_id
        req = models.InstanceCreate(name=name, kind="vm", image="rootfs", cpus=1, memory_mib=128,
                                    network="none", start=False)
        asm.create_vm(drv, inst_id, req, image.id, "bench", boot=boot)
        return inst_id

    def delete_vm(name):
        asm.remove_vm(drv, names[name], name, "bench")

    try:
        drv.virt_type  # the one-off accelerator probe is not part of a create
        # (a) create + start to running
        ours, peers = [], []
        base = pool.blob_path(digest)
        for i in range(RUNS + 1):  # the first run warms caches and is dropped
            name = f"bench-vm-{i}"
            t0 = time.monotonic()
            create_vm(name)
            info = drv.start(name)
            dt = time.monotonic() - t0
            assert info.state == "running"
            delete_vm(name)
            # peer: the same XML, disk and seed made beforehand, `virsh create`
            peer = f"bench-virsh-{i}"
            disk = f"{work}/{peer}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk],
                           check=True)
            seed = make_seed(f"{work}/{peer}-seed.iso", instance_id=peer, hostname=peer)
            from hypervisor.driver import DiskSpec, VmSpec
            spec = VmSpec(name=peer, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                          disks=(DiskSpec("vda", disk), DiskSpec("vdz", seed, format="raw", readonly=True)),
                          console_log=f"{work}/{peer}.log", kernel=kernel, initrd=initrd, cmdline=cmdline)
            xml = f"{work}/{peer}.xml"
            with open(xml, "w") as f:
                f.write(domain_xml(spec, virt_type=drv.virt_type, qmp_socket=drv.qmp_socket(peer)))
            t0 = time.monotonic()
            subprocess.run(["virsh", "-q", "-c", daemons.uri, "create", xml], check=True,
                           stdout=subprocess.DEVNULL)
            pt = time.monotonic() - t0
            subprocess.run(["virsh", "-q", "-c", daemons.uri, "destroy", peer], check=True,
                           stdout=subprocess.DEVNULL)
            if i:
                ours.append(dt * 1000)
                peers.append(pt * 1000)
        line("create_start_to_running_p50", statistics.median(ours), "virsh create (pre-made disk)",
             statistics.median(peers))

        # (b) start to the guest's marker on the serial console
        name = "bench-boot"
        inst_id = create_vm(name)
        log = f"{asm.instance_dir(inst_id)}/console.log"
        boots, bare = [], []
        for i in range(BOOT_RUNS):
            if os.path.exists(log):
                os.unlink(log)
            t0 = time.monotonic()
            drv.start(name)
            boots.append(wait_file(log, MARKER, t0) * 1000)
            drv.stop(name, force=True)
            serial = f"{work}/bare-{i}.log"
            t0 = time.monotonic()
            accel = "kvm" if drv.virt_type == "kvm" else "tcg"
            proc = subprocess.Popen(["qemu-system-x86_64", "-accel", accel, "-m", "128", "-nodefaults",
                                     "-display", "none", "-serial", f"file:{serial}", "-kernel", kernel,
                                     "-initrd", initrd, "-append", cmdline],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                bare.append(wait_file(serial, MARKER, t0) * 1000)
            finally:
                proc.kill()
                proc.wait()
        line("start_to_guest_marker_p50", statistics.median(boots), "qemu-system-x86_64 -kernel (bare)",
             statistics.median(bare))
        api_boot(daemons.uri, work, drv.virt_type)
    finally:
        for name in names:
            delete_vm(name)
        for out in subprocess.run(["virsh", "-q", "-c", daemons.uri, "list", "--name"], capture_output=True,
                                  text=True).stdout.split():
            if out.startswith("bench-virsh-"):
                subprocess.run(["virsh", "-q", "-c", daemons.uri, "destroy", out], capture_output=True)
        drv.close()
        shutil.rmtree(work, ignore_errors=True)
        daemons.stop()


if __name__ == "__main__":
    main()
