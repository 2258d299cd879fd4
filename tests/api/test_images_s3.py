"""Image source type ``s3`` through two real agents sharing one radosgw bucket: host A
imports into its object pool, host B imports the same image by digest and runs it."""
from __future__ import annotations

import os
import subprocess

import pytest

from testbed.agentproc import AgentProcess, Api
from tests.api.conftest import assert_error

pytestmark = pytest.mark.real


@pytest.fixture
def bucket(ceph):
    from testbed.ceph_cluster import s3_client

    name = "t" + os.urandom(6).hex()
    client = s3_client(ceph)
    client.create_bucket(Bucket=name)
    yield name
    for o in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=o["Key"])
    client.delete_bucket(Bucket=name)


def object_pool(ceph, bucket: str) -> str:
    return (f'[pools.images]\nkind = "object"\nendpoint = "{ceph.s3_endpoint}"\n'
            f'bucket = "{bucket}"\naccess_key = "{ceph.s3_access_key}"\n'
            f'secret_key = "{ceph.s3_secret_key}"\nregion = "{ceph.s3_region}"\n')


@pytest.fixture
def hosts(ceph, bucket, tmp_path):
    procs = []
    for name in ("a", "b"):
        p = AgentProcess(tmp_path / name, pool_kind="local", extra_config=object_pool(ceph, bucket))
        p.admin_token = p.token("admin", "admin")
        procs.append(p.start())
    yield [Api(p.url, p.admin_token) for p in procs]
    for p in procs:
        p.stop()


def _import(api, body) -> dict:
    r = api.post("/v1/images", json=body)
    assert r.status_code == 202, r.text
    return api.wait(r.json())


def test_s3_source_shares_an_image_between_hosts(hosts, tmp_path):
    a, b = hosts
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    op = _import(a, {"name": "tiny", "pool": "images", "source": {"type": "file", "path": str(disk)}})
    assert op["status"] == "succeeded", op
    img = op["result"]["image"]
    assert img["pool"] == "images"

    op = _import(b, {"name": "shared", "source": {"type": "s3", "pool": "images",
                                                  "digest": img["digest"]}})
    assert op["status"] == "succeeded", op
    got = op["result"]["image"]
    assert (got["id"], got["pool"], got["kind"], got["format"]) == (img["id"], "images", "vm", "qcow2")
    assert b.get("/v1/images/shared").json()["id"] == img["id"]
    r = b.post("/v1/instances", json={"name": "vm0", "kind": "vm", "image": "shared"})
    assert r.status_code == 202, r.text
    op = b.wait(r.json())
    assert op["status"] == "succeeded", op
    inst = b.get("/v1/instances/vm0").json()
    assert inst["pool"] == "default"  # the disk lives in the host's pool, not in S3

    # bad s3 sources: clear errors, nothing recorded
    assert_error(b.post("/v1/images", json={"name": "x", "source": {
        "type": "s3", "pool": "nope", "digest": img["digest"]}}), 404)
    e = assert_error(b.post("/v1/images", json={"name": "x", "source": {
        "type": "s3", "pool": "default", "digest": img["digest"]}}), 422)
    assert "object pool" in e["message"]
    assert_error(b.post("/v1/images", json={"name": "x", "source": {
        "type": "s3", "pool": "images", "digest": "sha256:xyz"}}), 422)
    op = _import(b, {"name": "missing", "source": {"type": "s3", "pool": "images",
                                                   "digest": "sha256:" + "5" * 64}})
    assert op["status"] == "failed" and "put the image there first" in op["error"]["message"]
    assert {i["name"] for i in b.get("/v1/images").json()["images"]} == {"shared"}


def test_s3_source_by_key_imports_any_object_of_the_bucket(hosts, bucket, ceph, tmp_path):
    """A control plane uploads images under its own keys; an agent imports one by key (its
    sha256 checked when given) into its local pool, a disk image or an OCI archive."""
    import hashlib

    from testbed.ceph_cluster import s3_client
    from testbed import ocibuild

    a, _ = hosts
    client = s3_client(ceph)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    client.upload_file(str(disk), bucket, "images/base/disk.qcow2")
    want = hashlib.sha256(disk.read_bytes()).hexdigest()
    layout = ocibuild.write_layout(str(tmp_path / "layout"), {"latest": ocibuild.busybox_layers()})
    client.upload_file(ocibuild.tar_dir(layout, str(tmp_path / "bb.tar")), bucket, "images/busybox.tar")

    op = _import(a, {"name": "by-key", "source": {"type": "s3", "pool": "images",
                                                  "key": "images/base/disk.qcow2", "sha256": want}})
    assert op["status"] == "succeeded", op
    img = op["result"]["image"]
    assert (img["id"], img["pool"], img["format"]) == (want, "default", "qcow2")
    op = _import(a, {"name": "bb", "format": "oci", "source": {"type": "s3", "pool": "images",
                                                             "key": "images/busybox.tar"}})
    assert op["status"] == "succeeded", op
    assert op["result"]["image"]["kind"] == "container"

    # bad keys and digests: clear errors, nothing recorded, no temp file left
    op = _import(a, {"name": "wrong", "source": {"type": "s3", "pool": "images",
                                                 "key": "images/base/disk.qcow2", "sha256": "6" * 64}})
    assert op["status"] == "failed" and "not the expected sha256" in op["error"]["message"], op
    op = _import(a, {"name": "gone", "source": {"type": "s3", "pool": "images", "key": "images/nope"}})
    assert op["status"] == "failed" and "not found" in op["error"]["message"], op
    for source in ({"type": "s3", "pool": "images"},
                   {"type": "s3", "pool": "images", "key": "k", "digest": "sha256:" + want},
                   {"type": "s3", "pool": "images", "digest": "sha256:" + want, "sha256": want}):
        assert_error(a.post("/v1/images", json={"name": "x", "source": source}), 422)
    assert {i["name"] for i in a.get("/v1/images").json()["images"]} == {"by-key", "bb"}
    assert not [p for p in (tmp_path / "a").rglob("object-*")]
