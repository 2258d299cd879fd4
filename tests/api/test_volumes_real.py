"""Volumes on real components, through the API and the CLI of a real agent.

VM (libvirt, TCG, booted from boot.qcow2): a local volume hot-attached to the running guest
appears in it (its init prints NODEAGENT-DISK-ADDED), grows online (a user-data script in the
guest prints the disks' sizes as the guest's kernel sees them), stays in the VM's definition
across an agent restart and a stop/start, and is hot-detached (NODEAGENT-DISK-REMOVED).

Container (runc, user namespace): a volume given at create is mounted at its path, writable
by the container's root, grows online (its ext4 filesystem with it), outlives the container
and carries its data to the next one; another is attached to and detached from the running
container live.
"""
import json
import os
import secrets
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from testbed.agentproc import AgentProcess, Api
from tests.api.test_vm_boot import (act, bridge, console, import_boot_image, start_agent,  # noqa: F401 - fixtures
                                    stop_agent, vmtmp, wait_console)

pytestmark = pytest.mark.real
MiB = 1024 * 1024
SEEN_TIMEOUT_S = 60
# the guest prints its virtio disks' sizes (512-byte sectors) whenever they change
SIZES_SCRIPT = """#!/bin/sh
( last=""; i=0; while [ $i -lt 1200 ]; do now=""
  for d in /sys/block/vd*; do now="$now $(basename $d)=$(cat $d/size)"; done
  [ "$now" != "$last" ] && echo "NODEAGENT-SIZES$now" && last="$now"; i=$((i+1)); sleep 0.5; done ) &
exit 0
"""


def wait_line(api: Api, name: str, pred, what: str, timeout: float = SEEN_TIMEOUT_S) -> str:
    """The first console line that ``pred`` accepts."""
    deadline = time.monotonic() + timeout
    while True:
        found = [ln for ln in console(api, name).splitlines() if pred(ln)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} on {name}'s console within {timeout}s:\n{console(api, name)[-3000:]}")
        time.sleep(0.3)


def wait_removed(api: Api, name: str, before: int) -> None:
    """Until the guest printed one more NODEAGENT-DISK-REMOVED than ``before``."""
    deadline = time.monotonic() + SEEN_TIMEOUT_S
    while console(api, name).count("NODEAGENT-DISK-REMOVED") == before:
        assert time.monotonic() < deadline, console(api, name)[-3000:]
        time.sleep(0.3)


def test_vm_hot_attach_grow_keep_and_detach_a_local_volume(libvirtd, guest_images, vmtmp, bridge):  # noqa: F811
    agent = start_agent(vmtmp / "vol", libvirtd, bridge)
    api = Api(agent.url, agent.token_value)
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.token_value}
    name = f"volvm-{secrets.token_hex(3)}"
    try:
        image = import_boot_image(api, guest_images["boot"])
        assert api.post("/v1/volumes", json={"name": "vol0", "size_mib": 16}).status_code == 201
        op = api.wait(api.post("/v1/instances", json={
            "name": name, "kind": "vm", "image": image["id"], "memory_mib": 192, "network": "none",
            "user_data": SIZES_SCRIPT, "volumes": [{"volume": "vol0"}]}).json(), timeout=120)
        assert op["status"] == "succeeded", op
        text = wait_console(api, name, boots=1)
        disks = [ln for ln in text.splitlines() if ln.startswith("NODEAGENT-DISKS ")][0]
        assert len(disks.split()) == 4, f"root, seed and the volume it was created with: {disks}"
        assert api.get("/v1/volumes/vol0").json()["attachment"]["target"] == "vdb"
        out = agent.cli("volume", "create", "vol1", "--size", "64M", "--json", env=env)
        vol = json.loads(out.stdout)
        assert vol["size_bytes"] == 64 * MiB and vol["state"] == "available"

        # hot-plug: the running guest sees a new disk
        out = agent.cli("volume", "attach", "vol1", name, "--json", env=env)
        assert json.loads(out.stdout)["attachment"]["target"] == "vdc"
        added = wait_line(api, name, lambda ln: ln.startswith("NODEAGENT-DISK-ADDED "), "NODEAGENT-DISK-ADDED")
        dev = added.split()[1]
        wait_line(api, name, lambda ln: ln.startswith("NODEAGENT-SIZES") and f" {dev}={64 * MiB // 512}" in ln,
                  f"{dev} at 64 MiB")
        bad = agent.cli("volume", "attach", "vol1", name, env=env, check=False)
        assert bad.returncode != 0 and "already" in bad.stderr and "Traceback" not in bad.stderr

        # online grow: the guest's kernel sees the new size without a reboot
        out = agent.cli("volume", "resize", "vol1", "--size", "96M", "--json", env=env)
        assert json.loads(out.stdout)["size_bytes"] == 96 * MiB
        wait_line(api, name, lambda ln: ln.startswith("NODEAGENT-SIZES") and f" {dev}={96 * MiB // 512}" in ln,
                  f"{dev} grown to 96 MiB")
        bad = agent.cli("volume", "resize", "vol1", "--size", "64M", env=env, check=False)
        assert bad.returncode != 0 and "only grow" in bad.stderr
        assert api.delete("/v1/volumes/vol1").status_code == 409

        # kept across an agent restart and a stop/start (in the VM's persistent definition)
        agent.stop()
        agent.start()
        assert api.get("/v1/volumes/vol1").json()["attachment"]["target"] == "vdc"
        assert act(api, name, "stop", timeout=60)["state"] == "stopped"
        assert act(api, name, "start")["state"] == "running"
        text = wait_console(api, name, boots=2)
        boot2 = text[text.index("NODEAGENT-READY") + 1:]
        disks = [ln for ln in boot2.splitlines() if ln.startswith("NODEAGENT-DISKS ")][0]
        assert len(disks.split()) == 5, f"root, seed and the two volumes: {disks}"

        # hot-unplug: the guest lets it go
        before = console(api, name).count("NODEAGENT-DISK-REMOVED")
        out = agent.cli("volume", "detach", "vol1", name, "--json", env=env)
        assert json.loads(out.stdout)["state"] == "available"
        wait_removed(api, name, before)
        assert "vdc" not in subprocess.run(["virsh", "-c", libvirtd, "domblklist", name], capture_output=True,
                                           text=True).stdout
        agent.cli("volume", "delete", "vol1", env=env)
        assert [v["name"] for v in api.get("/v1/volumes").json()["volumes"]] == ["vol0"]
        assert not list((vmtmp / "vol").rglob(f"v-{vol['id'][:12]}*")), "the volume's file is gone"
    finally:
        api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)


def test_vm_hot_attach_and_grow_an_rbd_volume(ceph, libvirtd, guest_images, vmtmp, bridge):  # noqa: F811
    """A VM on the local pool takes a volume of a block (Ceph RBD) pool through QEMU's librbd:
    hot-plugged, grown online (the RBD image while QEMU holds it, then block_resize), detached;
    a container cannot mount it here (no kernel rbd): 422, nothing made."""
    from tests.api.test_crash import _import_busybox
    pool = "t" + secrets.token_hex(5)
    ceph.run("ceph", "osd", "pool", "create", pool, "8", "8")
    ceph.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")
    block = (f'[pools.blk]\nkind = "block"\npool = "{pool}"\nconf = "{ceph.conf}"\n'
             f'user = "{ceph.user}"\nkeyring = "{ceph.keyring}"\n')
    agent = start_agent(vmtmp / "volrbd", libvirtd, bridge, extra=block)
    api = Api(agent.url, agent.token_value)
    name = f"volrbd-{secrets.token_hex(3)}"
    try:
        image = import_boot_image(api, guest_images["boot"])
        op = api.wait(api.post("/v1/instances", json={
            "name": name, "kind": "vm", "image": image["id"], "memory_mib": 192, "network": "none",
            "user_data": SIZES_SCRIPT}).json(), timeout=120)
        assert op["status"] == "succeeded", op
        r = api.post("/v1/volumes", json={"name": "rvol", "size_mib": 64, "pool": "blk"})
        assert r.status_code == 201 and r.json()["pool"] == "blk", r.text
        vid = r.json()["id"]
        assert f"navol.v-{vid[:12]}" in ceph.run("rbd", "ls", pool).stdout.split()
        # a container mounts host files only: refused before anything is made
        _import_busybox(api, vmtmp / "volrbd")
        r = api.post("/v1/instances", json={"name": "rbdc", "kind": "container", "image": "busybox",
                                            "command": ["sleep", "1"], "volumes": [{"volume": "rvol", "path": "/d"}]})
        assert r.status_code == 422 and "block pool" in r.json()["error"]["message"], r.text
        assert api.get("/v1/instances/rbdc").status_code == 404
        wait_console(api, name, boots=1)
        r = api.post(f"/v1/instances/{name}/volumes", json={"volume": "rvol"})
        assert r.status_code == 200, r.text
        dev = wait_line(api, name, lambda ln: ln.startswith("NODEAGENT-DISK-ADDED "), "NODEAGENT-DISK-ADDED").split()[1]
        vdb = next(d for d in ET.fromstring(subprocess.run(["virsh", "-c", libvirtd, "dumpxml", name],
                                                           capture_output=True, text=True).stdout
                                            ).findall("devices/disk") if d.find("target").get("dev") == "vdb")
        assert vdb.find("source").get("protocol") == "rbd", "attached through QEMU's librbd"
        r = api.patch("/v1/volumes/rvol", json={"size_mib": 80})
        assert r.status_code == 200 and r.json()["size_bytes"] == 80 * MiB, r.text
        wait_line(api, name, lambda ln: ln.startswith("NODEAGENT-SIZES") and f" {dev}={80 * MiB // 512}" in ln,
                  f"{dev} grown to 80 MiB")
        before = console(api, name).count("NODEAGENT-DISK-REMOVED")
        assert api.delete(f"/v1/instances/{name}/volumes/rvol").status_code == 200
        wait_removed(api, name, before)
        assert api.delete("/v1/volumes/rvol").status_code == 200
        assert f"navol.v-{vid[:12]}" not in ceph.run("rbd", "ls", pool).stdout.split()
    finally:
        api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)
        ceph.run("ceph", "osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it", check=False)


def test_runc_container_mounts_a_volume_given_at_create(open_tmp):
    for tool in ("runc", "conmon", "mkfs.ext4", "resize2fs"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from storage import mounts
    from testbed.runtimes import drop_test_network, test_network
    from tests.api.test_crash import _import_busybox
    bridge_name, subnet = test_network()
    agent = AgentProcess(open_tmp / "r", pool_kind="local", runtime="runc", network=(bridge_name, subnet))
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    names = [f"volc-{secrets.token_hex(3)}" for _ in range(2)]  # runc cgroups are host-wide: unique per run

    def sh(name, script):
        r = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", script]})
        assert r.status_code == 200, r.text
        return r.json()

    try:
        _import_busybox(api, open_tmp)
        assert api.post("/v1/volumes", json={"name": "cvol", "size_mib": 64}).status_code == 201
        out = agent.cli("instance", "create", names[0], "--kind", "container", "--image", "busybox",
                        "--memory", "64", "--volume", "cvol:/data", "--", "/bin/sh", "-c", "sleep 600", env=env)
        assert "running" in out.stdout, out
        res = sh(names[0], "echo kept > /data/f && cat /data/f && df -k /data | tail -1")
        assert res["exit_code"] == 0 and res["stdout"].startswith("kept\n"), res
        size1 = int(res["stdout"].splitlines()[1].split()[1])
        # grown while mounted: the filesystem grows online where the kernel lets root do it
        # (CAP_SYS_RESOURCE), else at its next mount (below)
        r = api.patch("/v1/volumes/cvol", json={"size_mib": 128})
        assert r.status_code == 200 and r.json()["size_bytes"] == 128 * MiB, r.text
        # an attached volume is held
        r = api.post(f"/v1/instances/{names[0]}/volumes", json={"volume": "cvol", "path": "/x"})
        assert r.status_code == 409
        assert api.delete("/v1/volumes/cvol").status_code == 409
        _live_attach_and_detach(api, agent, names[0], sh, open_tmp)
        # the container goes, the volume and its data stay: the next container sees them
        assert api.delete(f"/v1/instances/{names[0]}").status_code == 200
        assert not [p for p in mounts.mounts_under(str(open_tmp / "r")) if "/volumes/" in p], "unmounted"
        assert api.get("/v1/volumes/cvol").json()["state"] == "available"
        op = api.wait(api.post("/v1/instances", json={
            "name": names[1], "kind": "container", "image": "busybox", "memory_mib": 64, "start": False,
            "command": ["/bin/sh", "-c", "sleep 600"]}).json())
        assert op["status"] == "succeeded", op
        # attached while stopped: mounted from its next start
        assert api.post(f"/v1/instances/{names[1]}/volumes", json={"volume": "cvol", "path": "/srv/d"}
                        ).status_code == 200
        assert api.wait(api.post(f"/v1/instances/{names[1]}/actions", json={"action": "start"}).json()
                        )["status"] == "succeeded"
        res = sh(names[1], "cat /srv/d/f && df -k /srv/d | tail -1")
        assert res["stdout"].startswith("kept\n"), res
        assert int(res["stdout"].splitlines()[1].split()[1]) > size1 * 1.8, "the filesystem grew with the volume"
        # read-only: the container's root can neither write nor remount it writable
        def act(action):
            op = api.wait(api.post(f"/v1/instances/{names[1]}/actions", json={"action": action, "timeout": 2}).json())
            assert op["status"] == "succeeded", op
        act("stop")
        assert api.delete(f"/v1/instances/{names[1]}/volumes/cvol").status_code == 200
        assert api.post(f"/v1/instances/{names[1]}/volumes", json={"volume": "cvol", "path": "/ro", "readonly": True}
                        ).status_code == 200
        act("start")
        res = sh(names[1], "cat /ro/f; touch /ro/g; echo touch=$?; mount -o remount,rw /ro; echo remount=$?; "
                           "touch /ro/g; echo touch=$?")
        assert res["stdout"].startswith("kept\n") and "touch=0" not in res["stdout"], res
        assert api.delete(f"/v1/instances/{names[1]}").status_code == 200
        assert api.delete("/v1/volumes/cvol").status_code == 200
        assert not [p for p in mounts.mounts_under(str(open_tmp / "r")) if "/volumes/" in p]
    finally:
        for n in names:
            api.delete(f"/v1/instances/{n}")
        assert agent.stop() == 0
        drop_test_network(bridge_name, agent.rtag)
        assert not os.path.exists(f"/sys/class/net/{bridge_name}")


def _live_attach_and_detach(api, agent, name, sh, open_tmp):
    """A volume attached to the running (user-namespaced) or paused container is mounted at once,
    writable by its root, kept across a stop/start, detached live with its data kept; a path through a
    symlink is 422 with nothing left mounted; a tenant's second mount of it makes a detach 409."""
    from storage import mounts

    def vol_mounts():
        return sorted(p for p in mounts.mounts_under(str(open_tmp / "r")) if "/volumes/" in p)

    for v in ("lvol", "svol"):
        assert api.post("/v1/volumes", json={"name": v, "size_mib": 32}).status_code == 201
    old_mounts = vol_mounts()
    r = api.post(f"/v1/instances/{name}/volumes", json={"volume": "lvol", "path": "/live/d"})
    assert r.status_code == 200 and r.json()["attachment"]["path"] == "/live/d", r.text
    res = sh(name, "echo live > /live/d/f && cat /live/d/f && stat -c %u /live/d")
    assert res["exit_code"] == 0 and res["stdout"] == "live\n0\n", res
    before = vol_mounts()
    # a symlinked component: refused, nothing mounted, the volume free
    sh(name, "ln -s /tmp /lnk")
    r = api.post(f"/v1/instances/{name}/volumes", json={"volume": "svol", "path": "/lnk/x"})
    assert r.status_code == 422, r.text
    assert vol_mounts() == before and api.get("/v1/volumes/svol").json()["state"] == "available"
    assert sh(name, "test -e /tmp/x; echo $?")["stdout"] == "1\n", "nothing made through the link"
    # a second mount of it in the container (as a tenant with CAP_SYS_ADMIN would bind it; made
    # from the host here: the container's root lacks the capability): the detach is refused and
    # the volume stays attached until that mount goes
    point = (set(before) - set(old_mounts)).pop()
    state_dir = point.rsplit("/containers/", 1)[0]
    pid = json.loads(subprocess.run(["runc", "--root", os.path.join(state_dir, "runc"), "state", name],
                                    capture_output=True, text=True, check=True).stdout)["pid"]
    mounts.mount_into_ns(pid, point, "/b")
    assert api.delete(f"/v1/instances/{name}/volumes/lvol").status_code == 409
    assert api.get("/v1/volumes/lvol").json()["state"] == "attached"
    assert sh(name, "cat /b/f")["stdout"] == "live\n"  # the stop below ends that mount
    # kept across a stop/start
    for action in ("stop", "start"):
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": action, "timeout": 2}).json())
        assert op["status"] == "succeeded", op
    assert sh(name, "cat /live/d/f /data/f")["stdout"] == "live\nkept\n"
    # detached live: gone from the container and the host; its data kept (attached again elsewhere)
    assert api.delete(f"/v1/instances/{name}/volumes/lvol").status_code == 200
    assert sh(name, "grep -c ' /live/d ' /proc/self/mountinfo")["stdout"].strip() == "0"
    assert len(vol_mounts()) == len(before) - 1
    # a paused (frozen) container takes it too
    assert api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "pause"}).json()
                    )["status"] == "succeeded"
    assert api.post(f"/v1/instances/{name}/volumes", json={"volume": "lvol", "path": "/again"}).status_code == 200
    assert api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "resume"}).json()
                    )["status"] == "succeeded"
    assert sh(name, "cat /again/f")["stdout"] == "live\n"
    # the first volume out and in again live: its host slot is out of order until the next
    # start puts the slots in order (stopped: remounted), both kept
    assert api.delete(f"/v1/instances/{name}/volumes/cvol").status_code == 200
    assert api.post(f"/v1/instances/{name}/volumes", json={"volume": "cvol", "path": "/data"}).status_code == 200
    assert [p.rsplit("/", 1)[1] for p in vol_mounts()] == ["1", "2"]
    assert sh(name, "cat /data/f")["stdout"] == "kept\n"
    for action in ("stop", "start"):
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": action, "timeout": 2}).json())
        assert op["status"] == "succeeded", op
    assert sh(name, "cat /again/f /data/f")["stdout"] == "live\nkept\n"
    assert [p.rsplit("/", 1)[1] for p in vol_mounts()] == ["0", "1"]
    assert api.delete(f"/v1/instances/{name}/volumes/lvol").status_code == 200
    for v in ("lvol", "svol"):
        assert api.delete(f"/v1/volumes/{v}").status_code == 200
