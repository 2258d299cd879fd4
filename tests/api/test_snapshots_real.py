"""Snapshots on the real components, one agent for both (libvirt under TCG, runc):

- a VM booted from boot.qcow2 through the API whose user-data script, at every boot, mounts its
  root partition (vda2) read-write, prints the marker it finds there and writes the next one.
  A snapshot taken while it runs (after boot 1 wrote marker 1) is restored after boot 2 wrote
  marker 2: boot 3 finds marker 1 again. At boot 1 a guest agent (testbed.guest_agent, on the
  VM's org.qemu.guest_agent.0 port) freezes vda2 for that snapshot (filesystem-consistent, the
  console shows FROZEN then THAWED); at boot 2 a hostile one answers noise (the RBD test: never),
  and the snapshot then is crash-consistent, taken all the same. A second snapshot is taken and deleted while it runs
  (QMP), restore of a running VM is a 409; a rebuild gives it a fresh disk (boot 4 finds no
  marker) with the same id and MAC; deleting the VM leaves no snapshot row.
- a runc container: a file written before a snapshot taken while it runs (frozen for the copy)
  is back after a restore, one written after it is gone; a rebuild drops every write (the
  image's files are back) and runs it again; deleting the container removes the snapshot's
  copy with it.
"""
from __future__ import annotations

import secrets
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from testbed.agentproc import Api
from testbed.guest_agent import QGA_FUNCTION
from tests.api.test_crash import _import_busybox
from tests.api.test_vm_boot import (OP_TIMEOUT_S, act, bridge, console, import_boot_image, start_agent,  # noqa: F401
                                    stop_agent, virsh, vmtmp)

pytestmark = pytest.mark.real
BOOT_TIMEOUT_S = 180

# runs at every boot (scripts/test-guest/init): the marker on the root partition, then the next
# one; then a guest agent (testbed.guest_agent) in the background: at boot 1 one that answers and
# really freezes the root partition (left mounted for it), at boot 2 the scenario's ``second``
# (garbage, silent: hostile ones; none), none after
MARKER_SCRIPT = "#!/bin/sh\n" + QGA_FUNCTION + """
mkdir -p /mnt/snap && mount -t ext4 /dev/vda2 /mnt/snap || exit 9
n=$(cat /mnt/snap/nodeagent-marker 2>/dev/null || echo 0)
echo "NODEAGENT-MARK $n"
echo $((n + 1)) > /mnt/snap/nodeagent-marker
sync
case "$n" in 0) mode=ok ;; 1) mode=@SECOND@ ;; *) mode=none ;; esac
if [ "$mode" = ok ]; then qga ok /mnt/snap & exit 0; fi
umount /mnt/snap
[ "$mode" = none ] || qga "$mode" &
"""


def _exits(api: Api, name: str, n: int) -> str:
    """The console once the user-data script finished its ``n``-th run."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while True:
        text = console(api, name)
        if text.count("NODEAGENT-USERDATA-EXIT") >= n:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"no NODEAGENT-USERDATA-EXIT #{n} on {name}'s console:\n{text[-3000:]}")
        time.sleep(0.5)


def _console_until(api: Api, name: str, marker: str) -> str:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while marker not in (text := console(api, name)):
        if time.monotonic() > deadline:
            pytest.fail(f"no {marker} on {name}'s console:\n{text[-3000:]}")
        time.sleep(0.2)
    return text


def _marks(text: str) -> list[str]:
    return [ln.split()[1] for ln in text.splitlines() if ln.startswith("NODEAGENT-MARK ")]


def _disk(libvirtd: str, name: str) -> str:
    vda = next(d for d in ET.fromstring(virsh(libvirtd, "dumpxml", name)).findall("devices/disk")
               if d.find("target").get("dev") == "vda")
    return vda.find("source").get("file")


def _internal_snapshots(path: str) -> list[str]:
    out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", path], capture_output=True, text=True).stdout
    return [ln.split()[1] for ln in out.splitlines()[2:] if len(ln.split()) > 1]


def _agent_connected(libvirtd: str, vm: str, text: str) -> None:
    """Wait until the guest's agent announced itself on the console and libvirt sees its port open."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while True:
        ch = [c for c in ET.fromstring(virsh(libvirtd, "dumpxml", vm)).findall("devices/channel/target")
              if c.get("name") == "org.qemu.guest_agent.0"]
        if ch and ch[0].get("state") == "connected":
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{vm}'s guest agent port is not connected: {[c.attrib for c in ch]}\n{text[-2000:]}")
        time.sleep(0.2)


def _vm_marker_scenario(api: Api, libvirtd: str, image: dict, vm: str, pool: str | None, on_disk,
                        rebuild: bool = False, second: str = "none") -> None:
    """Boot 1 writes marker 1 and runs a guest agent; a snapshot while it runs, its filesystems
    frozen by the agent; boot 2 finds 1 and writes 2, its agent ``second`` (garbage, silent or none):
    a live take+delete is crash-consistent; stop, restore, start: boot 3 finds 1 again.
    ``on_disk()``: the snapshots the VM's disk holds (as its pool sees them)."""
    op = api.wait(api.post("/v1/instances", json={
        "name": vm, "kind": "vm", "image": image["id"], "cpus": 1, "memory_mib": 192, "network": "none",
        "user_data": MARKER_SCRIPT.replace("@SECOND@", second), **({"pool": pool} if pool else {})}).json(),
        timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    inst = op["result"]["instance"]
    text = _exits(api, vm, 1)
    assert _marks(text) == ["0"], "boot 1 found no marker (and wrote 1)"
    _agent_connected(libvirtd, vm, text)
    r = api.post(f"/v1/instances/{vm}/snapshots", json={"name": "after-boot1"})
    assert r.status_code == 201, r.text
    assert (r.json()["consistency"], r.json()["instance_state"]) == ("filesystem-consistent", "running")
    assert virsh(libvirtd, "domstate", vm).strip() == "running", "taken without stopping the VM"
    assert api.get(f"/v1/instances/{vm}/snapshots/after-boot1").json()["consistency"] == "filesystem-consistent"
    text = _console_until(api, vm, "NODEAGENT-THAWED")
    assert "NODEAGENT-FROZEN" in text and text.index("NODEAGENT-FROZEN") < text.index("NODEAGENT-THAWED"), \
        f"the guest froze its filesystems, then thawed them:\n{text[-2000:]}"
    assert on_disk() == ["after-boot1"], "kept with the VM's own disk"
    r = api.post(f"/v1/instances/{vm}/snapshots/after-boot1/restore")
    assert r.status_code == 409 and "stop it first" in r.json()["error"]["message"], r.text

    assert act(api, vm, "restart")["state"] == "running"
    text = _exits(api, vm, 2)
    assert _marks(text) == ["0", "1"], "boot 2 found marker 1 (and wrote 2)"
    if second != "none":  # a hostile agent: connected, answers noise; the snapshot goes on without it
        _agent_connected(libvirtd, vm, text)
    # taken and deleted while it runs: with no agent (or a hostile one) crash-consistent
    r = api.post(f"/v1/instances/{vm}/snapshots", json={"name": "live-tmp"})
    assert r.status_code == 201 and r.json()["consistency"] == "crash-consistent", r.text
    assert console(api, vm).count("NODEAGENT-FROZEN") == 1, "nothing froze at boot 2"
    assert virsh(libvirtd, "domstate", vm).strip() == "running"
    assert api.delete(f"/v1/instances/{vm}/snapshots/live-tmp").json() == {"deleted": True}
    assert on_disk() == ["after-boot1"]

    assert act(api, vm, "stop", force=True)["state"] == "stopped"
    r = api.post(f"/v1/instances/{vm}/snapshots/after-boot1/restore")
    assert r.status_code == 200, r.text
    assert act(api, vm, "start")["state"] == "running"
    assert _marks(_exits(api, vm, 3)) == ["0", "1", "1"], "boot 3 found marker 1 again: marker 2 is gone"
    assert [s["name"] for s in api.get(f"/v1/instances/{vm}/snapshots").json()["snapshots"]] == ["after-boot1"]
    after = api.get(f"/v1/instances/{vm}").json()
    assert (after["id"], after["mac"]) == (inst["id"], inst["mac"]), "restored in place"
    if rebuild:  # a fresh root disk from the image: boot 4 finds no marker; the seed (user-data) stays
        assert api.delete(f"/v1/instances/{vm}/snapshots/after-boot1").json() == {"deleted": True}
        rebuilt = act(api, vm, "rebuild", force=True)
        assert (rebuilt["id"], rebuilt["mac"], rebuilt["state"]) == (inst["id"], inst["mac"], "running")
        assert _marks(_exits(api, vm, 4)) == ["0", "1", "1", "0"], "boot 4 found a fresh disk"
    assert api.delete(f"/v1/instances/{vm}").json() == {"deleted": True}
    assert vm not in virsh(libvirtd, "list", "--all", "--name").split()


def test_vm_and_container_snapshots_restore_in_place(libvirtd, guest_images, vmtmp, bridge):  # noqa: F811
    for tool in ("runc", "conmon"):
        assert subprocess.run(["which", tool], capture_output=True).returncode == 0, \
            f"{tool} is not installed: run scripts/setup-host"
    agent = start_agent(vmtmp / "snap", libvirtd, bridge)
    agent.stop()
    agent.config.write_text(agent.config.read_text().replace('runtime = "fake"', 'runtime = "runc"'))
    agent.start()
    api = Api(agent.url, agent.token_value)
    vm, ct = f"snapvm-{secrets.token_hex(3)}", f"snapct-{secrets.token_hex(3)}"
    try:
        _vm_marker_scenario(api, libvirtd, import_boot_image(api, guest_images["boot"]), vm, None,
                            lambda: _internal_snapshots(_disk(libvirtd, vm)), rebuild=True, second="garbage")

        # -- a runc container --
        _import_busybox(api, vmtmp)
        op = api.wait(api.post("/v1/instances", json={
            "name": ct, "kind": "container", "image": "busybox", "cpus": 0.5, "memory_mib": 64, "network": "none",
            "command": ["/bin/sh", "-c", "sleep 600"]}).json())
        assert op["status"] == "succeeded", op

        def sh(cmd: str) -> dict:
            body = {"command": ["/bin/sh", "-c", "b=/bin/busybox; " + cmd]}
            return api.post(f"/v1/instances/{ct}/exec", json=body).json()

        assert sh("echo one > /before && $b rm /etc/keep")["exit_code"] == 0
        r = api.post(f"/v1/instances/{ct}/snapshots", json={"name": "c1"})
        assert r.status_code == 201 and r.json()["consistency"] == "frozen", r.text
        assert api.get(f"/v1/instances/{ct}").json()["state"] == "running", "thawed after the copy"
        assert sh("echo two > /after && $b rm /before && echo back > /etc/keep")["exit_code"] == 0
        assert act(api, ct, "stop", force=True)["state"] == "stopped"
        assert api.post(f"/v1/instances/{ct}/snapshots/c1/restore").status_code == 200
        assert act(api, ct, "start")["state"] == "running"
        ex = sh("$b cat /before; $b ls /after /etc/keep 2>&1; true")
        assert ex["stdout"].splitlines()[0] == "one", ex
        assert "/after: No such file" in ex["stdout"] and "/etc/keep: No such file" in ex["stdout"], \
            "what was written after the snapshot is gone; its whiteout (rm /etc/keep) is back"
        snap_dir = agent.state_dir / "containers" / "containers" / ct / "snapshots" / "c1"
        assert snap_dir.is_dir(), "the copy lives in the container's state"
        # a rebuild (from its own image) drops every write, the running container runs again
        assert "delete them" in api.post(f"/v1/instances/{ct}/actions", json={"action": "rebuild"}).json()[
            "error"]["message"], "refused while it has snapshots"
        assert api.delete(f"/v1/instances/{ct}/snapshots/c1").json() == {"deleted": True}
        assert not snap_dir.exists()
        ct_id = api.get(f"/v1/instances/{ct}").json()["id"]
        rebuilt = act(api, ct, "rebuild", force=True)
        assert (rebuilt["id"], rebuilt["state"]) == (ct_id, "running"), rebuilt
        ex = sh("$b ls /before 2>&1; $b cat /etc/keep")
        assert "/before: No such file" in ex["stdout"] and ex["stdout"].endswith("keep\n"), ex
        assert sh("echo again > /x && $b cat /x")["stdout"] == "again\n", "its rootfs is writable again"
        assert api.post(f"/v1/instances/{ct}/snapshots", json={"name": "c1"}).status_code == 201
        assert api.delete(f"/v1/instances/{ct}").json() == {"deleted": True}
        assert not snap_dir.exists(), "and goes with it"
    finally:
        api.delete(f"/v1/instances/{vm}")
        api.delete(f"/v1/instances/{ct}")
        stop_agent(agent, bridge)


def test_vm_snapshots_on_an_rbd_pool(ceph, libvirtd, guest_images, vmtmp, bridge):  # noqa: F811
    """The same on a block (Ceph RBD) pool: RBD snapshots of the VM's root volume, taken by
    librbd while QEMU writes to it; a rollback only with no client on the image."""
    pool = "t" + secrets.token_hex(5)
    ceph.run("ceph", "osd", "pool", "create", pool, "8", "8")
    ceph.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")
    block = (f'[pools.blk]\nkind = "block"\npool = "{pool}"\nconf = "{ceph.conf}"\n'
             f'user = "{ceph.user}"\nkeyring = "{ceph.keyring}"\n')
    agent = start_agent(vmtmp / "snaprbd", libvirtd, bridge, extra=block)
    api = Api(agent.url, agent.token_value)
    vm = f"snaprbd-{secrets.token_hex(3)}"

    def on_disk() -> list[str]:
        inst = api.get(f"/v1/instances/{vm}").json()
        out = ceph.run("rbd", "snap", "ls", f"{pool}/navol.{inst['volumes'][0]}").stdout
        return [ln.split()[1] for ln in out.splitlines()[1:] if len(ln.split()) > 1]

    try:
        _vm_marker_scenario(api, libvirtd, import_boot_image(api, guest_images["boot"]), vm, "blk", on_disk,
                            second="silent")
        assert not [n for n in ceph.run("rbd", "ls", pool).stdout.split() if n.startswith("navol.")], \
            "the volume and its snapshots went with the VM"
    finally:
        api.delete(f"/v1/instances/{vm}")
        stop_agent(agent, bridge)
        ceph.run("ceph", "osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it", check=False)
