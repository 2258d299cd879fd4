"""storage.registry.pull_to_layout against a real docker-registry on 127.0.0.1."""
from __future__ import annotations

import json
import os

import pytest

from agent.errors import Cancelled, Forbidden, InvalidInput, NotFound, Unavailable
from storage.registry import parse_reference, pull_to_layout
from storage.sources import AddressPolicy
from testbed.registry_server import push_busybox

pytestmark = pytest.mark.real
LOCAL = AddressPolicy(["127.0.0.1/32"])  # the test registry listens on loopback


def layout_manifest(layout: str, tag: str) -> dict:
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    with open(os.path.join(layout, "blobs", *desc["digest"].split(":"))) as f:
        return json.load(f)


def config_of(layout: str, manifest: dict) -> dict:
    with open(os.path.join(layout, "blobs", *manifest["config"]["digest"].split(":"))) as f:
        return json.load(f)


def test_pull_by_tag(busybox_ref, tmp_path):
    dest = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, dest, tls_verify=False, policy=LOCAL)
    assert tag == "test"
    m = layout_manifest(dest, tag)
    assert config_of(dest, m)["config"]["Cmd"] == ["sh"]
    assert len(m["layers"]) == 1


def test_pull_by_digest(oci_registry, busybox_ref, tmp_path):
    m = layout_manifest_from_pull(busybox_ref, tmp_path / "a")
    with open(tmp_path / "a" / "index.json") as f:
        digest = json.load(f)["manifests"][0]["digest"]
    name = busybox_ref.rsplit(":", 1)[0]
    tag = pull_to_layout(f"{name}@{digest}", str(tmp_path / "b"), tls_verify=False, policy=LOCAL)
    assert tag == digest.split(":")[1][:12]
    assert layout_manifest(str(tmp_path / "b"), tag) == m  # the digest pinned the content


def layout_manifest_from_pull(ref, dest):
    tag = pull_to_layout(ref, str(dest), tls_verify=False, policy=LOCAL)
    return layout_manifest(str(dest), tag)


def test_multiarch_index_resolves_to_amd64(oci_registry, tmp_path):
    ref = push_busybox(oci_registry, str(tmp_path), repo="multi", tag="v1", multiarch=True)
    dest = str(tmp_path / "layout")
    tag = pull_to_layout(ref, dest, tls_verify=False, policy=LOCAL)
    m = layout_manifest(dest, tag)
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert config_of(dest, m)["architecture"] == "amd64"


def test_unknown_image_is_not_found_and_leaves_nothing(oci_registry, tmp_path):
    dest = tmp_path / "layout"
    with pytest.raises(NotFound, match="not in its registry"):
        pull_to_layout(f"{oci_registry.address}/nope:missing", str(dest), tls_verify=False, policy=LOCAL)
    assert not dest.exists()


def test_unreachable_registry_and_bad_reference(tmp_path):
    from testbed.runtimes import find_free_port
    with pytest.raises(Unavailable):
        pull_to_layout(f"127.0.0.1:{find_free_port()}/x:y", str(tmp_path / "l"),
                       tls_verify=False, policy=LOCAL)
    for bad in ("UPPER/case", "a b", "x@sha256:123", ""):
        with pytest.raises(InvalidInput):
            parse_reference(bad)
    assert parse_reference("127.0.0.1:5000/busybox:test") == ("127.0.0.1:5000/busybox",
                                                             "test", None)


def unpack_layout(layout: str, tag: str, dest: str) -> tuple[list[str], dict]:
    """Layers unpacked by hand (the store's path is in test_image_to_container.py), so a
    pull problem and a store problem fail different tests; (lowerdirs top first,
    image config)."""
    import tarfile
    m = layout_manifest(layout, tag)
    dirs = []
    for i, layer in enumerate(m["layers"]):
        d = os.path.join(dest, f"layer{i}")
        os.makedirs(d)
        with tarfile.open(os.path.join(layout, "blobs", *layer["digest"].split(":"))) as t:
            t.extractall(d)  # our own test image (testbed/registry_server.py)
        dirs.append(d)
    return dirs[::-1], config_of(layout, m)["config"]


def test_pull_then_run_a_container(busybox_ref, tmp_path):
    from containers import ContainerSpec, NetworkSpec, Rootfs
    from testbed.runtimes import make_runc
    layout = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, layout, tls_verify=False, policy=LOCAL)
    lowers, image_config = unpack_layout(layout, tag, str(tmp_path / "layers"))
    rt, cleanup = make_runc(tmp_path)
    try:
        spec = ContainerSpec(name="pulled", rootfs=Rootfs(tuple(lowers), str(tmp_path / "up"),
                                                          str(tmp_path / "work")),
                             command=("sh", "-c", "echo $IMAGE; cat /www/index.html"),
                             image_config=image_config, network=NetworkSpec())
        rt.create(spec)
        rt.start("pulled")
        import time
        deadline = time.monotonic() + 10
        while rt.get("pulled").state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.get("pulled").exit_code == 0
        assert rt.logs("pulled") == "busybox-test\nhello from busybox\n"
    finally:
        cleanup()


def test_loopback_registry_is_refused_unless_allowed(busybox_ref, tmp_path):
    with pytest.raises(Forbidden, match="loopback.*allow_url_hosts"):
        pull_to_layout(busybox_ref, str(tmp_path / "l"), tls_verify=False)
    with pytest.raises(Forbidden, match="loopback"):
        pull_to_layout("localhost:5000/x:y", str(tmp_path / "l"), tls_verify=False)
    assert not (tmp_path / "l").exists()


def _silent_registry():
    """A registry that accepts TCP connections and never answers."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_hung_registry_stalls_out_and_cancels_within_a_second(tmp_path):
    import threading
    import time
    srv = _silent_registry()
    ref = f"127.0.0.1:{srv.getsockname()[1]}/x:y"
    try:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="stalled.*stall_timeout"):
            pull_to_layout(ref, str(tmp_path / "a"), tls_verify=False, policy=LOCAL,
                           stall_timeout=2)
        assert time.monotonic() - t0 < 30
        cancel = threading.Event()
        threading.Timer(1.0, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            pull_to_layout(ref, str(tmp_path / "b"), tls_verify=False, policy=LOCAL,
                           cancel=cancel, stall_timeout=600)
        assert time.monotonic() - t0 < 2.5  # the cancel at 1 s took effect within a second
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    finally:
        srv.close()
