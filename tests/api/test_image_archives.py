"""Hostile image archives through a real agent: links and fifos inside an image are
refused with a clear failed operation, and an archive imported without ``format`` is
never stored as a raw VM disk."""
from __future__ import annotations

import json
import os
import tarfile

from testbed import ocibuild

WORKERS = 8  # testbed/agentproc.py's worker pool: hangs that many and every create stalls


def save_dir(d) -> str:
    """An unpacked `docker save` of busybox at ``d``; returns its path."""
    tar = ocibuild.write_docker_save(str(d) + ".tar", ocibuild.busybox_layers())
    with tarfile.open(tar) as t:
        t.extractall(d)  # our own test archive
    os.unlink(tar)
    return str(d)


def manifest(d: str) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)[0]


def import_op(admin, name: str, path: str, **body) -> dict:
    r = admin.post("/v1/images", json={"name": name, "source": {"type": "file", "path": path},
                                       **body})
    assert r.status_code == 202, r.text
    return r.json()


def names(api) -> set:
    return {i["name"] for i in api.get("/v1/images").json()["images"]}


def test_docker_save_dir_with_config_linked_to_a_root_file_is_refused(admin, reader, tmp_path):
    secret = tmp_path / "root-only.json"
    secret.write_text(json.dumps({"os": "linux", "architecture": "amd64",
                                  "config": {"Env": ["DB_PASSWORD=hunter2"]}}))
    os.chmod(secret, 0o600)
    d = save_dir(tmp_path / "evil")
    cfg = os.path.join(d, manifest(d)["Config"])
    os.unlink(cfg)
    os.symlink(str(secret), cfg)
    op = admin.wait(import_op(admin, "evil-config", d))
    assert op["status"] == "failed", op
    assert op["error"]["code"] == "invalid"
    assert "symlink" in op["error"]["message"] and "hunter2" not in json.dumps(op)
    assert "evil-config" not in names(admin)
    assert "hunter2" not in reader.get("/v1/images").text


def test_fifo_layers_are_refused_and_never_hold_the_worker_pool(admin, tmp_path):
    ops = []
    for i in range(WORKERS + 1):  # more than the pool: each one used to hang a worker forever
        d = save_dir(tmp_path / f"fifo{i}")
        layer = os.path.join(d, manifest(d)["Layers"][0])
        os.unlink(layer)
        os.mkfifo(layer)
        ops.append(import_op(admin, f"fifo-{i}", d))
    for op in ops:
        op = admin.wait(op, timeout=120)  # generous: a refusal takes milliseconds
        assert op["status"] == "failed", op
        assert "fifo" in op["error"]["message"], op
    # the pool is free: a good import right after still runs
    good = admin.wait(import_op(admin, "after-fifos", save_dir(tmp_path / "good")), timeout=120)
    assert good["status"] == "succeeded", good
    assert good["result"]["image"]["kind"] == "container"
    assert not {f"fifo-{i}" for i in range(WORKERS + 1)} & names(admin)


def test_tar_without_format_is_never_a_raw_disk(admin, tmp_path):
    # a hostile bare layer tar, as the layer tests use: not an image, and not a disk
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(ocibuild.layer([("../../escape", "file", b"x")]))
    op = admin.wait(import_op(admin, "bare-layer", str(layer)))
    assert op["status"] == "failed", op
    assert "index.json" in op["error"]["message"], op
    assert "bare-layer" not in names(admin)
    # declared raw: refused, with the fix in the message
    op = admin.wait(import_op(admin, "as-raw", str(layer), format="raw"))
    assert op["status"] == "failed" and "format oci" in op["error"]["message"], op
    # a `docker save` tar without format is a container image, not a disk
    save = ocibuild.write_docker_save(str(tmp_path / "save.tar"), ocibuild.busybox_layers())
    op = admin.wait(import_op(admin, "saved", save))
    assert op["status"] == "succeeded", op
    img = op["result"]["image"]
    assert (img["kind"], img["format"]) == ("container", "oci")
