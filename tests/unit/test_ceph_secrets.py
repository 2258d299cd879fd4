"""hypervisor.secrets naming and hypervisor.validate's cephx key check (no libvirtd needed)."""
import pytest

from agent.errors import InvalidInput
from hypervisor.driver import DiskSpec, VmSpec
from hypervisor.fake import FakeDriver
from hypervisor.secrets import ceph_secret_uuid
from hypervisor.validate import ceph_key_bytes

KEY = "AQDKTgVr/8wAMhAA8B4PL9b8eQp+cXB6qksXMg=="
OTHER_KEY = "AQA8TwVrkwyrNRAALInC7L8QO4CuVPwPXrsE2w=="
MONS = ["127.0.0.1:3300", "127.0.0.2:3300"]


def test_secret_uuid_is_stable_and_keyed_by_monitors_user_and_key():
    sid = ceph_secret_uuid(MONS, "admin", KEY)
    assert sid == ceph_secret_uuid(list(reversed(MONS)), "admin", KEY)  # same cluster, any order
    assert len({sid, ceph_secret_uuid(MONS, "nova", KEY), ceph_secret_uuid(MONS[:1], "admin", KEY),
                ceph_secret_uuid(MONS, "admin", OTHER_KEY)}) == 4  # a rotated key never overwrites


def test_a_cephx_key_decodes_and_junk_is_refused():
    assert len(ceph_key_bytes(KEY)) == 28
    for junk in ("", "not-a-key", "QUJD", KEY[:-4], None):
        with pytest.raises(InvalidInput, match="not a cephx key"):
            ceph_key_bytes(junk)


def test_fake_driver_refuses_a_malformed_key_like_libvirt():
    disk = DiskSpec(target="vda", source="rbd/img", type="rbd", format="raw",
                    attach={"monitors": MONS, "user": "admin", "key": "nope"})
    d = FakeDriver()
    with pytest.raises(InvalidInput, match="not a cephx key"):
        d.define(VmSpec(name="k", uuid="6f1c2a64-0d3b-4a53-9b7e-1f3f2d6c9a10", cpus=1, memory_mib=64,
                        disks=(disk,)))
    assert d.find("k") is None
