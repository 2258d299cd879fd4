"""Pure helpers of migration: the destination's domain XML, the upper-dir prune, the peer check."""
import os
import xml.etree.ElementTree as ET

import pytest

from agent.errors import Forbidden, Unprocessable
from hypervisor.driver import MigrationOptions

XML = """<domain type='qemu'><name>v</name><devices>
<disk type='file' device='disk'><source file='/src/pool/v.qcow2'/><backingStore type='file'>
<source file='/src/pool/base'/></backingStore><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/src/seed.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
<serial type='pty'><log file='/src/console.log' append='on'/><target port='0'/></serial>
</devices></domain>"""


def test_rewrite_xml_moves_disks_and_console_to_destination_paths():
    from hypervisor.libvirt_migration import rewrite_xml
    out = ET.fromstring(rewrite_xml(XML, MigrationOptions(
        disk_sources={"vda": "/dst/pool/v.qcow2", "sda": "/dst/seed.iso"}, console_log="/dst/console.log")))
    assert [d.find("source").get("file") for d in out.findall("devices/disk")] == \
        ["/dst/pool/v.qcow2", "/dst/seed.iso"]
    assert out.find("devices/disk/backingStore") is None  # the destination probes its own chain
    assert out.find("devices/serial/log").get("file") == "/dst/console.log"


def test_prune_removes_what_the_source_deleted(tmp_path):
    from agent.migration.transfer import prune_rootfs, rootfs_paths
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a").write_text("a")
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "b").write_text("b")
    (tmp_path / "stale").write_text("s")
    keep = {"keep", "keep/a"}
    assert prune_rootfs(str(tmp_path), keep) == 2
    assert sorted(rootfs_paths(str(tmp_path))) == ["keep", os.path.join("keep", "a")]


def test_only_configured_peers_with_admin_tokens_are_accepted(tmp_path):
    from agent.config import parse
    from agent.migration import MigrationService

    class Root:
        config = parse({"state_dir": str(tmp_path), "peers": {"h1": {"url": "http://198.18.0.10:8470"}}})
    svc = MigrationService(Root())
    assert svc.require_peer({"name": "h1", "role": "admin"}) == "h1"
    for caller in ({"name": "admin", "role": "admin"}, {"name": "h1", "role": "reader"}, None):
        with pytest.raises(Forbidden, match="configured peers"):
            svc.require_peer(caller)
    with pytest.raises(Unprocessable, match=r"\[peers.h9\]"):
        svc.peer("h9")


def test_a_full_peer_is_insufficient_resources_and_others_keep_their_codes():
    from agent.errors import CommandFailed, Conflict, InsufficientResources, NotFound
    from agent.migration.peer import peer_error
    e = peer_error("h2", 507, "pool 'default' on x has 0.0 MiB free")
    assert isinstance(e, InsufficientResources) and e.http_status == 507
    assert e.message == "destination 'h2' is out of space: pool 'default' on x has 0.0 MiB free"
    assert isinstance(peer_error("h2", 404, "m"), NotFound)
    assert isinstance(peer_error("h2", 409, "m"), Conflict)
    assert isinstance(peer_error("h2", 500, "m"), CommandFailed)


def test_allocated_bytes_counts_what_a_copy_writes_not_holes(tmp_path):
    from agent.migration.transfer import allocated_bytes
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.write(b"x" * 4096)
    assert 4096 <= allocated_bytes(str(sparse)) < 1024 * 1024
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_bytes(b"y" * 100_000)
    assert allocated_bytes(str(d)) >= 100_000
    assert allocated_bytes(str(tmp_path / "absent")) == 0 and allocated_bytes(None) == 0


def test_the_prepare_body_is_built_once_from_the_model_the_destination_parses():
    from types import SimpleNamespace

    from agent import models
    from agent.migration.source import finish_request, incoming_request
    from agent.services.records import Instance
    inst = Instance(id="a" * 32, name="web", kind="vm", image="b" * 64, state="running", pool="default",
                    spec={"name": "web", "kind": "vm", "image": "tiny", "memory_mib": 64, "image_id": "b" * 64},
                    volumes=("i-aaaa-disk",), mac="52:54:00:00:00:01")
    image = SimpleNamespace(id="b" * 64, name="tiny", format="qcow2", kind="vm", size=1000)
    req = incoming_request(inst, image, data_bytes=5, disk_size=1 << 20)
    assert isinstance(req, models.IncomingMigration) and req.spec.memory_mib == 64
    body = req.model_dump(mode="json", exclude_unset=True)
    assert body == {"instance": {"id": "a" * 32, "name": "web", "kind": "vm", "pool": "default",
                                 "volumes": ["i-aaaa-disk"], "mac": "52:54:00:00:00:01", "ip": None},
                    "spec": dict(inst.spec), "data_bytes": 5, "image_bytes": 1000, "disk_size": 1 << 20,
                    "image": {"id": "b" * 64, "name": "tiny", "format": "qcow2", "kind": "vm"}}
    assert finish_request(define=True).model_dump(exclude_unset=True) == {"define": True}
    with pytest.raises(Unprocessable, match="keep"):
        finish_request(keep=["/absolute"])
