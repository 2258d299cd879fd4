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
