"""End to end: registry -> OCI layout -> ImageStore -> rootfs -> RuncRuntime."""
from __future__ import annotations

import time

import pytest

from containers import ContainerSpec, NetworkSpec, Rootfs
from storage import ImageStore
from storage.local import LocalBackend
from storage.registry import pull_to_layout
from storage.sources import AddressPolicy
from testbed.runtimes import make_runc

pytestmark = pytest.mark.real


def test_pull_import_prepare_run_delete(busybox_ref, tmp_path, db):
    layout = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, layout, tls_verify=False,
                         policy=AddressPolicy(["127.0.0.1/32"]))  # the test registry is on loopback
    store = ImageStore(db, {"local": LocalBackend("local", path=str(tmp_path / "pool"))},
                       default_pool="local", cache_dir=str(tmp_path / "cache"))
    image = store.import_oci(layout, name="busybox", ref=tag)
    assert image.kind == "container" and image.config["Cmd"] == ["sh"]
    layers = store.prepare_rootfs(image.id, "ctr-vol")
    rt, cleanup = make_runc(tmp_path)
    try:
        spec = ContainerSpec(name="e2e", rootfs=Rootfs(tuple(layers.lowerdirs), layers.upperdir,
                                                       layers.workdir),
                             command=("sh", "-c", "echo $IMAGE > /made; cat /made /www/index.html"),
                             image_config=image.config, network=NetworkSpec())
        rt.create(spec)
        rt.start("e2e")
        deadline = time.monotonic() + 10
        while rt.get("e2e").state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.get("e2e").exit_code == 0
        assert rt.logs("e2e") == "busybox-test\nhello from busybox\n"
        assert rt.delete("e2e")
    finally:
        cleanup()
    # the write went to the container's own upper dir, never into the shared layers
    import os
    assert open(os.path.join(layers.upperdir, "made")).read() == "busybox-test\n"
    assert not any(os.path.exists(os.path.join(d, "made")) for d in layers.lowerdirs)
    assert store.release("local", "ctr-vol")
    assert store.delete(image.id)
