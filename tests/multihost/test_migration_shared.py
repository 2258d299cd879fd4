"""Live migration of a VM on shared storage (a `block` pool on Ceph RBD): memory only.

Two simulated hosts plus a storage host running Ceph on the test bridge
(harness.Cluster(ceph=True)); each agent has a block pool `shared` on that Ceph pool.
POST /v1/migrations moves the running guest: its RBD image is neither copied nor deleted
(same RBD image id before and after), the destination adopts it and defines the cephx
secret, the source forgets it. A migration that fails after the destination prepared
leaves the guest running on the source, the image intact and the destination clean; a
destination whose pool does not see the image refuses and keeps nothing. A VM's volume on the
shared pool is adopted the same way while its local root disk is copied."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from testbed import harness
from tests.multihost.checks import OP_TIMEOUT_S, assert_runs, domains, migrate

pytestmark = pytest.mark.real

# the source pauses before the copy, so the fault lands after the destination prepared:
SLOW_MIGRATE_S = {"cancel": 30,  # the cancel ends the pause at once
                  "kill": 8}  # the source finds the destination agent dead after it
POOL = harness.SHARED_POOL


@pytest.fixture(scope="module")
def cluster():
    with harness.running_cluster("nodeagent-mhs", ceph=True) as c:
        yield c


def create_vm(api, image) -> dict:
    name = f"shr-{uuid.uuid4().hex[:6]}"
    op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": image, "cpus": 1,
                                                  "memory_mib": 128, "network": "none", "pool": POOL}).json(),
                  timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    return api.get(f"/v1/instances/{name}").json()


def rbd_id(ceph, volume: str) -> str | None:
    """The RBD image id of a volume (None if it is gone): a copy would have another id."""
    r = ceph.run("rbd", "info", f"{ceph.rbd_pool}/navol.{volume}", "--format", "json", check=False)
    return json.loads(r.stdout)["id"] if r.returncode == 0 else None


def rbd_images(ceph) -> list[str]:
    return sorted(json.loads(ceph.run("rbd", "ls", ceph.rbd_pool, "--format", "json").stdout))


def ceph_secrets(host) -> list[str]:
    out = host.run("virsh", "-c", "qemu:///system", "secret-list", timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if "nodeagent:" in line]


def assert_clean(host, api, inst):
    """Nothing of ``inst`` on ``host``: no record, domain, instance dir or Ceph secret."""
    assert api.get(f"/v1/instances/{inst['name']}").status_code == 404
    assert inst["name"] not in domains(host)
    assert not (host.state_dir / "instances" / inst["id"]).exists()
    assert ceph_secrets(host) == []


def test_ceph_on_the_storage_host_is_reached_from_every_host_and_the_test(cluster):
    ceph = cluster.ceph
    addr = cluster.storage.address
    assert ceph.mon.startswith(f"{addr}:")
    osds = json.loads(ceph.run("ceph", "osd", "dump", "--format", "json").stdout)["osds"]
    assert osds and all(f"{addr}:" in o["public_addr"] for o in osds)  # reachable over the bridge
    for h in cluster.hosts:  # the same conf and keyring paths work inside each host's namespaces
        r = h.run("rbd", "-c", ceph.conf, "--id", ceph.user, "--keyring", ceph.keyring, "ls", ceph.rbd_pool,
                  check=False, timeout=60)
        assert r.returncode == 0, r.stderr


def test_shared_storage_live_migration_moves_memory_only_and_back(cluster, apis, image):
    h1, h2 = cluster.hosts
    ceph = cluster.ceph
    inst = create_vm(apis["h1"], image)
    name, vol = inst["name"], inst["volumes"][0]
    before_id, before_images = rbd_id(ceph, vol), rbd_images(ceph)
    assert before_id and ceph_secrets(h1)
    op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    assert op["result"]["destination"] == "h2" and op["result"]["total_ms"] > 0
    # the destination runs the guest on the very same RBD image: nothing copied, cloned or deleted
    moved = apis["h2"].get(f"/v1/instances/{name}").json()
    assert moved["id"] == inst["id"] and moved["pool"] == POOL and moved["volumes"] == [vol]
    assert_runs(apis["h2"], name)
    assert rbd_id(ceph, vol) == before_id and rbd_images(ceph) == before_images
    xml = h2.run("virsh", "-c", "qemu:///system", "dumpxml", name, timeout=30).stdout
    assert f"name='{ceph.rbd_pool}/navol.{vol}'" in xml and "type='ceph'" in xml
    assert ceph_secrets(h2)
    # the source forgot it (its cephx secret too) but left the image alone
    assert_clean(h1, apis["h1"], inst)
    # and back: the destination owns the volume now and hands it on the same way
    op = migrate(apis["h2"], name, "h1")
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h1"], name)
    assert rbd_id(ceph, vol) == before_id
    assert_clean(h2, apis["h2"], inst)
    # the host that owns it deletes it for real
    assert apis["h1"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert rbd_id(ceph, vol) is None
    assert ceph_secrets(h1) == []


def test_a_vms_rbd_volume_is_adopted_while_its_local_disk_is_copied(cluster, apis, image):
    """A VM on the local pool with a volume on the shared pool: live migration copies the
    local root disk only; h2 adopts the very RBD image of the volume (same image id, its cephx
    secret defined there) and lists it attached to the VM; h1 forgets it without deleting it."""
    h1, h2 = cluster.hosts
    ceph = cluster.ceph
    name = f"shv-{uuid.uuid4().hex[:6]}"
    op = apis["h1"].wait(apis["h1"].post("/v1/instances", json={
        "name": name, "kind": "vm", "image": image, "cpus": 1, "memory_mib": 128, "network": "none"}).json(),
        timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    vol = apis["h1"].post("/v1/volumes", json={"name": name + "-v", "size_mib": 16, "pool": POOL}).json()
    assert apis["h1"].post(f"/v1/instances/{name}/volumes", json={"volume": vol["name"]}).status_code == 200
    backend = "v-" + vol["id"][:12]
    before = rbd_id(ceph, backend)
    assert before
    op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    there = apis["h2"].get(f"/v1/volumes/{vol['id']}").json()
    assert (there["name"], there["pool"], there["attachment"]["instance_name"], there["attachment"]["target"]) == \
        (vol["name"], POOL, name, "vdb"), there
    assert rbd_id(ceph, backend) == before, "adopted, not copied"
    xml = h2.run("virsh", "-c", "qemu:///system", "dumpxml", name, timeout=30).stdout
    assert f"name='{ceph.rbd_pool}/navol.{backend}'" in xml and ceph_secrets(h2)
    assert_runs(apis["h2"], name)
    assert apis["h1"].get(f"/v1/volumes/{vol['id']}").status_code == 404
    assert name not in domains(h1) and ceph_secrets(h1) == []
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert apis["h2"].delete(f"/v1/volumes/{vol['id']}").json() == {"deleted": True}
    assert rbd_id(ceph, backend) is None


def _restart_agent(host, env=None):
    host.stop_agent()
    host.start_agent(env=env)


@pytest.mark.parametrize("fault", ["cancel", "kill"])
def test_failure_after_prepare_keeps_the_guest_and_the_image_then_retry(cluster, apis, image, fault):
    """cancel: the source aborts and asks the destination to clean up. kill: the destination
    agent dies; the source gives up, and the destination cleans up when it starts again."""
    h1, h2 = cluster.hosts
    ceph = cluster.ceph
    inst = create_vm(apis["h1"], image)
    name, vol = inst["name"], inst["volumes"][0]
    before_id = rbd_id(ceph, vol)
    _restart_agent(h1, {"NODEAGENT_SLOW_PHASE": f"migration:migrate={SLOW_MIGRATE_S[fault]}"})
    try:
        r = apis["h1"].post("/v1/migrations", json={"instance": name, "destination": "h2", "mode": "live"})
        assert r.status_code == 202, r.text
        op = r.json()
        deadline = time.monotonic() + 60
        while apis["h1"].get(f"/v1/operations/{op['id']}").json()["progress"].get("phase") != "migrate":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # h2 prepared: it adopted the volume, wrote the seed and defined the secret
        assert apis["h2"].get(f"/v1/instances/{name}").json()["state"] == "incoming"
        assert ceph_secrets(h2)
        if fault == "cancel":
            apis["h1"].delete(f"/v1/operations/{op['id']}")
            op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
            assert op["status"] == "cancelled", op
        else:
            h2.kill_agent()
            op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
            assert op["status"] == "failed" and "keeps running here" in op["error"]["message"], op
            h2.start_agent()  # its restart removes what it had prepared, but not the shared image
    finally:
        _restart_agent(h1)
        if not h2.pids.get("agent"):  # the test failed before starting it again
            h2.start_agent()
    assert_runs(apis["h1"], name)
    assert rbd_id(ceph, vol) == before_id  # the destination's cleanup did not delete the shared image
    assert_clean(h2, apis["h2"], inst)
    # the retry succeeds: h2 kept no reference to the volume
    op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h2"], name)
    assert rbd_id(ceph, vol) == before_id
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert rbd_id(ceph, vol) is None


def test_destination_on_another_ceph_pool_refuses_and_keeps_nothing(cluster, apis, image):
    """h2's pool `shared` names another Ceph pool: it does not see the guest's image, so its
    prepare refuses after it had started (row, instance dir); it removes that and nothing else."""
    h1, h2 = cluster.hosts
    ceph = cluster.ceph
    inst = create_vm(apis["h1"], image)
    name, vol = inst["name"], inst["volumes"][0]
    before_id = rbd_id(ceph, vol)
    other = "other" + uuid.uuid4().hex[:6]
    ceph.run("ceph", "osd", "pool", "create", other, "8", "8")
    ceph.run("ceph", "osd", "pool", "application", "enable", other, "rbd")
    config = h2.agent_config.read_text()
    h2.agent_config.write_text(config.replace(f'pool = "{ceph.rbd_pool}"', f'pool = "{other}"'))
    _restart_agent(h2)
    try:
        op = migrate(apis["h1"], name, "h2")
        assert op["status"] == "failed", op
        assert "must name the same Ceph pool" in op["error"]["message"]
        assert_runs(apis["h1"], name)
        assert rbd_id(ceph, vol) == before_id
        assert_clean(h2, apis["h2"], inst)
        assert json.loads(ceph.run("rbd", "ls", other, "--format", "json").stdout) == []  # nothing made there
    finally:
        h2.agent_config.write_text(config)
        _restart_agent(h2)
        ceph.run("ceph", "osd", "pool", "delete", other, other, "--yes-i-really-really-mean-it", check=False)
    assert apis["h1"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert rbd_id(ceph, vol) is None
