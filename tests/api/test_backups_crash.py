"""kill -9 of a real agent (fake driver, real local pool) in the middle of a backup's export (its
artifact half-written into the pool) and of a restore (its volume made, not yet filled; the new VM's
disk cloned, not yet filled, its volume attached):
the restarted agent lists no half-made backup and no half-made instance, and leaves no partial
artifact, staging dir or disk behind. A slow phase is injected with NODEAGENT_SLOW_PHASE
(agent/operations.py) so the kill lands where it should."""
from __future__ import annotations

import os
import time

from testbed.agentproc import AgentProcess, Api

SLOW = "backup.create:bytes=60,backup.restore:volume-data=60"


def _until(api: Api, op_id: str, phase: str) -> None:
    deadline = time.monotonic() + 30
    while (api.get(f"/v1/operations/{op_id}").json()["progress"] or {}).get("phase") != phase:
        assert time.monotonic() < deadline, f"operation {op_id} never reached {phase}"
        time.sleep(0.05)


def _artifact(tmp_path, image) -> bytes:
    """A backup of a VM made from ``image`` (a layer over it, as another host would send)."""
    import hashlib
    import subprocess

    from storage import backups as artifacts
    image_id = hashlib.sha256(image.read_bytes()).hexdigest()
    layer = tmp_path / "layer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f"/elsewhere/{image_id}", "-u",
                    str(layer), "16M"], check=True)
    vol = tmp_path / "volume.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vol), "16M"], check=True)
    members = [artifacts.member_entry("image.qcow2", "image", str(image)),
               artifacts.member_entry("disk.qcow2", "disk", str(layer), target="vda", layer=True),
               artifacts.member_entry("volume-0.qcow2", "volume", str(vol), volume={
                   "name": "crash-vol", "size_bytes": 16 << 20, "target": "vdb", "readonly": False})]
    manifest = {"format": artifacts.FORMAT, "version": artifacts.VERSION, "id": "0" * 32, "kind": "vm",
                "created_at": time.time(), "spec": {"cpus": 1, "memory_mib": 128},
                "image": {"id": image_id, "name": "tiny", "kind": "vm", "format": "qcow2"}, "members": members}
    return artifacts.ArtifactStream(manifest, {"image.qcow2": str(image), "disk.qcow2": str(layer),
                                               "volume-0.qcow2": str(vol)}).read()


def test_kill9_during_a_backup_and_a_restore(tmp_path):
    agent = AgentProcess(tmp_path / "k", pool_kind="local", env={"NODEAGENT_SLOW_PHASE": SLOW})
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    backups = tmp_path / "k" / "pool" / "backups"
    volumes = tmp_path / "k" / "pool" / "volumes"
    staging = tmp_path / "k" / "cache" / "tmp"
    try:
        disk = tmp_path / "vm.qcow2"
        import subprocess
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        op = api.wait(api.post("/v1/images", json={"name": "tiny", "source": {"type": "file",
                                                                              "path": str(disk)}}).json())
        assert op["status"] == "succeeded", op
        op = api.wait(api.post("/v1/instances", json={"name": "crash-src", "kind": "vm", "image": "tiny",
                                                      "memory_mib": 128}).json())
        assert op["status"] == "succeeded", op

        # 1. killed while another artifact is being written into the pool
        op = api.post("/v1/instances/crash-src/backups", json={}).json()
        _until(api, op["id"], "upload")
        deadline = time.monotonic() + 30
        while not [n for n in os.listdir(backups) if n.endswith(".part")]:
            assert time.monotonic() < deadline, "the artifact was never begun"
            time.sleep(0.05)
        agent.kill9()
        agent.start()
        assert api.get("/v1/backups").json() == {"backups": []}
        assert os.listdir(backups) == [], "no partial artifact left"
        assert not [n for n in os.listdir(staging) if n.startswith("backup-")], "no staging dir left"

        # 2. killed while a restore fills its first volume, and then while it fills its new disk (the
        # volume made and attached): of a backup uploaded (the VM is lost with the fake driver's state)
        r = api.post("/v1/backups", data=_artifact(tmp_path, disk))
        assert r.status_code == 201, r.text
        backup = r.json()
        vols = set(os.listdir(volumes))
        for phase, slow in (("volume-data", "backup.restore:fill=60"), ("fill", None)):
            op = api.post(f"/v1/backups/{backup['id']}/restore", json={"name": "crash-dst"}).json()
            _until(api, op["id"], phase)
            assert len(set(os.listdir(volumes)) - vols) >= 1, "the new volume or disk was made"
            assert [v["name"] for v in api.get("/v1/volumes").json()["volumes"]] == ["crash-vol"], phase
            agent.kill9()
            agent.env["NODEAGENT_SLOW_PHASE"] = slow
            if slow is None:
                agent.env.pop("NODEAGENT_SLOW_PHASE")
            agent.start()
            assert api.get("/v1/instances/crash-dst").status_code == 404, phase
            assert "crash-dst" not in [i["name"] for i in api.get("/v1/instances").json()["instances"]]
            assert api.get("/v1/volumes").json()["volumes"] == [], f"no volume left ({phase})"
            assert set(os.listdir(volumes)) == vols, f"no half-made disk or volume left ({phase})"
            assert not [n for n in os.listdir(staging) if n.startswith("backup-")], "no staging dir left"
        op = api.wait(api.post(f"/v1/backups/{backup['id']}/restore", json={"name": "crash-dst"}).json())
        assert op["status"] == "succeeded", op
    finally:
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()
        assert agent.stop() == 0
