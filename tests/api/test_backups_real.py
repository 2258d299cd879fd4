"""Backups on the real components: two agents (hosts A and B) on libvirt (TCG) with local disk
pools, sharing one radosgw bucket as their object pool "backups".

A VM on A (the test guest's rootfs.qcow2, with a pattern written into its disk before it runs,
and a raw volume attached holding another) is backed up while it runs: the copy comes from an
internal snapshot of its root disk taken for it (and removed after it) and its volume is copied
in the same short pause, the VM runs on. A killed (kill -9) during a second backup's multipart upload
aborts that upload and drops its snapshot at its restart. A is then treated as lost: B lists the backup from the bucket,
restores it as a new VM (B lacks the image: it comes out of the backup), and B's new disk holds
A's pattern over B's own copy of the image, its new volume (same name: free on B) the volume's.
A backup whose bytes were changed in the bucket is
refused (422) with nothing made on B; deleting the backup on B removes it for A too.
"""
from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from testbed.agentproc import Api
from tests.api.test_images_s3 import bucket, object_pool  # noqa: F401
from tests.api.test_vm_boot import OP_TIMEOUT_S, act, bridge, start_agent, stop_agent, virsh, vmtmp  # noqa: F401

pytestmark = pytest.mark.real
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
PATTERN, AT, LEN = "0x5a", "1M", "24M"  # what A's guest disk holds before it runs: past one S3 part (16 MiB)


def _pool(ceph, name: str) -> str:
    return object_pool(ceph, name).replace("[pools.images]", "[pools.backups]")


@pytest.fixture
def hosts(ceph, bucket, libvirtd, vmtmp, bridge):  # noqa: F811
    agents = [start_agent(vmtmp / f"host-{h}", libvirtd, bridge, extra=_pool(ceph, bucket)) for h in "ab"]
    yield [Api(a.url, a.token_value) for a in agents], agents
    for a in agents:
        stop_agent(a, bridge)


def _disk(libvirtd: str, name: str, target: str = "vda") -> str:
    vda = next(d for d in ET.fromstring(virsh(libvirtd, "dumpxml", name)).findall("devices/disk")
               if d.find("target").get("dev") == target)
    return vda.find("source").get("file")


def _qemu_io(path: str, cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], capture_output=True, text=True)


def _internal_snapshots(path: str) -> list[str]:
    out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", path], capture_output=True, text=True).stdout
    return [ln.split()[1] for ln in out.splitlines()[2:] if len(ln.split()) > 1]


def test_a_running_vm_backed_up_to_s3_is_restored_on_another_host(hosts, ceph, bucket, libvirtd):  # noqa: F811
    from testbed.ceph_cluster import s3_client
    (a, b), agents = hosts
    op = a.wait(a.post("/v1/images", json={"name": "guest", "source": {
        "type": "file", "path": f"{IMAGES}/rootfs.qcow2"}}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    image = op["result"]["image"]
    vol = a.post("/v1/volumes", json={"name": "bk-vol", "size_mib": 32})
    assert vol.status_code == 201, vol.text
    op = a.wait(a.post("/v1/instances", json={"name": "bk-src", "kind": "vm", "image": image["id"], "cpus": 1,
                                              "memory_mib": 192, "network": "none", "start": False,
                                              "volumes": [{"volume": "bk-vol"}]}).json(),
                timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    src_disk = _disk(libvirtd, "bk-src")
    w = _qemu_io(src_disk, f"write -P {PATTERN} {AT} {LEN}")
    assert w.returncode == 0, w.stderr
    src_vol = _disk(libvirtd, "bk-src", "vdb")
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 4M 1M", src_vol], capture_output=True, text=True)
    assert w.returncode == 0, w.stderr
    act(a, "bk-src", "start")

    r = a.post("/v1/instances/bk-src/backups", json={"pool": "backups"})
    assert r.status_code == 202, r.text
    op = a.wait(r.json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    backup = op["result"]["backup"]
    assert (backup["pool"], backup["kind"], backup["instance"]) == ("backups", "vm", "bk-src")
    assert (backup["instance_state"], backup["consistency"]) == ("running", "crash-consistent")
    assert a.get("/v1/instances/bk-src").json()["state"] == "running", "backed up without stopping it"
    assert _internal_snapshots(src_disk) == [], "the snapshot the copy read is gone"
    keys = sorted(o["Key"] for o in s3_client(ceph).list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == [f"backups/{backup['id']}.json", f"backups/{backup['id']}.tar"], keys

    # A is killed while a second backup's multipart upload is under way: its restart aborts the
    # upload and drops the snapshot the copy read; the first backup is untouched
    agents[0].stop()
    agents[0].env["NODEAGENT_SLOW_PHASE"] = "backup.create:bytes=60"
    agents[0].start()
    op2 = a.post("/v1/instances/bk-src/backups", json={"pool": "backups"}).json()
    s3 = s3_client(ceph)
    deadline = time.monotonic() + 60
    while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, a.get(f"/v1/operations/{op2['id']}").json()
        time.sleep(0.1)
    agents[0].kill9()
    agents[0].env.pop("NODEAGENT_SLOW_PHASE")
    agents[0].start()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "the upload was aborted"
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])) == keys
    assert [x["id"] for x in a.get("/v1/backups").json()["backups"]] == [backup["id"]]
    assert _internal_snapshots(src_disk) == [], "the snapshot the killed copy read is gone"
    assert a.get("/v1/instances/bk-src").json()["state"] == "running", "re-adopted"

    # host A is lost: host B sees the backup in the shared bucket and restores it
    assert [x["id"] for x in b.get("/v1/backups").json()["backups"]] == [backup["id"]]
    assert b.get(f"/v1/backups/{backup['id']}").json()["sha256"] == backup["sha256"]
    assert b.get("/v1/images").json()["images"] == [], "B starts without the image"
    r = b.post(f"/v1/backups/{backup['id']}/restore", json={"name": "bk-dst", "start": False})
    assert r.status_code == 202, r.text
    op = b.wait(r.json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    inst = op["result"]["instance"]
    assert (inst["name"], inst["state"], inst["image"]) == ("bk-dst", "stopped", image["id"])
    assert [i["id"] for i in b.get("/v1/images").json()["images"]] == [image["id"]], "imported from the backup"
    dst_disk = _disk(libvirtd, "bk-dst")
    assert dst_disk != src_disk and dst_disk.startswith(str(agents[1].state_dir)), dst_disk
    rd = _qemu_io(dst_disk, f"read -P {PATTERN} {AT} {LEN}")
    assert rd.returncode == 0 and "Pattern verification failed" not in rd.stdout, rd.stdout + rd.stderr
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", dst_disk], capture_output=True, text=True)
    assert str(agents[1].state_dir) in info.stdout, "its base is B's copy of the image, not A's"
    (v,) = b.get("/v1/volumes").json()["volumes"]
    assert (v["name"], v["attachment"]["instance_name"], v["attachment"]["target"]) == ("bk-vol", "bk-dst", "vdb")
    dst_vol = _disk(libvirtd, "bk-dst", "vdb")
    assert dst_vol != src_vol and dst_vol.startswith(str(agents[1].state_dir)), dst_vol
    rd = subprocess.run(["qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0x3c 4M 1M", dst_vol],
                        capture_output=True, text=True)
    assert rd.returncode == 0 and "Pattern verification failed" not in rd.stdout, rd.stdout + rd.stderr
    act(b, "bk-dst", "start")

    # the artifact changed in the bucket: its checksum fails, nothing is made on B
    key = f"backups/{backup['id']}.tar"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    before = b.get("/v1/instances").json()
    op = b.wait(b.post(f"/v1/backups/{backup['id']}/restore", json={"name": "bk-bad"}).json(),
                timeout=OP_TIMEOUT_S)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "checksum" in op["error"]["message"], op["error"]
    assert b.get("/v1/instances").json() == before and b.get("/v1/instances/bk-bad").status_code == 404
    assert "bk-bad" not in virsh(libvirtd, "list", "--all", "--name").split()
    tmp = agents[1].state_dir / "cache" / "tmp"
    assert not [n for n in os.listdir(tmp) if n.startswith("backup-")], "no staging dir left"

    assert b.delete(f"/v1/backups/{backup['id']}").json() == {"deleted": True}
    assert a.get("/v1/backups").json()["backups"] == [] and a.get(f"/v1/backups/{backup['id']}").status_code == 404
    for api, name in ((a, "bk-src"), (b, "bk-dst")):
        assert api.delete(f"/v1/instances/{name}").status_code == 200
        assert api.delete("/v1/volumes/bk-vol").status_code == 200


def test_an_rbd_backed_vm_is_backed_up_from_rbd_snapshots_and_restored_onto_rbd_and_local(
        ceph, libvirtd, vmtmp, bridge):  # noqa: F811
    """A running VM whose root disk and attached volume are RBD images of a block pool, each
    with a pattern written before it ran: its backup (into the local pool) reads both from RBD
    snapshots taken in one short pause (removed after), the VM runs on. Restored onto the
    block pool (its disk and volume new RBD images) and onto the local pool (a qcow2 overlay
    and a raw file), each holds the patterns."""
    import secrets
    pool = "t" + secrets.token_hex(5)
    ceph.run("ceph", "osd", "pool", "create", pool, "8", "8")
    ceph.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")
    block = (f'[pools.blk]\nkind = "block"\npool = "{pool}"\nconf = "{ceph.conf}"\n'
             f'user = "{ceph.user}"\nkeyring = "{ceph.keyring}"\n')
    agent = start_agent(vmtmp / "bkrbd", libvirtd, bridge, extra=block)
    api = Api(agent.url, agent.token_value)

    def spec(image: str) -> str:
        return f"rbd:{pool}/{image}:id={ceph.user}:conf={ceph.conf}:keyring={ceph.keyring}"

    def io(image: str, cmd: str, ro: bool = False) -> None:
        r = subprocess.run(["qemu-io", *(["-r"] if ro else []), "-f", "raw", "-c", cmd, spec(image)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr

    def snaps(image: str) -> list[str]:
        return [ln.split()[1] for ln in ceph.run("rbd", "snap", "ls", f"{pool}/{image}").stdout.splitlines()[1:]]

    try:
        op = api.wait(api.post("/v1/images", json={"name": "guest", "source": {
            "type": "file", "path": f"{IMAGES}/rootfs.qcow2"}}).json(), timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
        image = op["result"]["image"]
        vol = api.post("/v1/volumes", json={"name": "bkr-vol", "size_mib": 32, "pool": "blk"})
        assert vol.status_code == 201, vol.text
        vimg = f"navol.v-{vol.json()['id'][:12]}"
        op = api.wait(api.post("/v1/instances", json={
            "name": "bkr-src", "kind": "vm", "image": image["id"], "cpus": 1, "memory_mib": 192, "pool": "blk",
            "network": "none", "start": False, "volumes": [{"volume": "bkr-vol"}]}).json(), timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op["error"]
        root = f"navol.{op['result']['instance']['volumes'][0]}"
        io(root, f"write -P {PATTERN} {AT} 4M")
        io(vimg, "write -P 0x3c 4M 1M")
        act(api, "bkr-src", "start")

        op = api.wait(api.post("/v1/instances/bkr-src/backups", json={"pool": "default"}).json(),
                      timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op["error"]
        backup = op["result"]["backup"]
        assert (backup["instance_state"], backup["consistency"]) == ("running", "crash-consistent"), backup
        assert api.get("/v1/instances/bkr-src").json()["state"] == "running"
        assert snaps(root) == [] and snaps(vimg) == [], "the RBD snapshots the copy read are gone"

        for name, target in (("bkr-rbd", "blk"), ("bkr-loc", "default")):
            op = api.wait(api.post(f"/v1/backups/{backup['id']}/restore", json={
                "name": name, "pool": target, "start": False}).json(), timeout=OP_TIMEOUT_S)
            assert op["status"] == "succeeded", op["error"]
            inst = op["result"]["instance"]
            assert inst["pool"] == target
            (v,) = [v for v in api.get("/v1/volumes").json()["volumes"]
                    if (v["attachment"] or {}).get("instance_name") == name]
            assert (v["name"], v["pool"], v["attachment"]["target"]) == (f"{name}-bkr-vol", target, "vdb"), v
            if target == "blk":
                io(f"navol.{inst['volumes'][0]}", f"read -P {PATTERN} {AT} 4M", ro=True)
                io(f"navol.v-{v['id'][:12]}", "read -P 0x3c 4M 1M", ro=True)
            else:
                rd = _qemu_io(_disk(libvirtd, name), f"read -P {PATTERN} {AT} 4M")
                assert rd.returncode == 0 and "verification failed" not in rd.stdout, rd.stdout + rd.stderr
                rd = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x3c 4M 1M",
                                     _disk(libvirtd, name, "vdb")], capture_output=True, text=True)
                assert rd.returncode == 0 and "verification failed" not in rd.stdout, rd.stdout + rd.stderr
        act(api, "bkr-rbd", "start")
    finally:
        for name in ("bkr-src", "bkr-rbd", "bkr-loc"):
            api.delete(f"/v1/instances/{name}")
        for v in api.get("/v1/volumes").json()["volumes"]:
            api.delete(f"/v1/volumes/{v['id']}")
        stop_agent(agent, bridge)
        ceph.run("ceph", "osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it", check=False)
