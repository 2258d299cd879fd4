"""storage.oci: every image form (OCI layout dir and tar, `docker save` dir and tar) reads
regular files only, never through a link, and never more than their descriptors say."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading

import pytest

from agent.errors import InvalidInput
from storage import oci
from testbed import ocibuild

FORMS = ["layout-dir", "layout-tar", "save-dir", "save-tar"]


@pytest.fixture
def secret(tmp_path):
    """A root-only host file whose content must never become part of an image."""
    p = tmp_path / "shadow.json"
    p.write_text(json.dumps({"os": "linux", "architecture": "amd64",
                             "config": {"Env": ["ROOT_PASSWORD=hunter2"]}}))
    os.chmod(p, 0o600)
    return str(p)


def layout_dir(tmp_path) -> str:
    return ocibuild.write_layout(str(tmp_path / "layout"), {"latest": ocibuild.busybox_layers()})


def save_dir(tmp_path) -> str:
    tar = ocibuild.write_docker_save(str(tmp_path / "save.tar"), ocibuild.busybox_layers())
    d = tmp_path / "save"
    with tarfile.open(tar) as t:
        t.extractall(d)  # our own test archive
    os.unlink(tar)
    return str(d)


def resolve_and_read(path):
    """What an import does with a source: resolve, then read every blob to its end."""
    with oci.open_source(path) as src:
        r = src.resolve()
        for d in (r.config, *r.layers):
            with src.open_blob(d) as f:
                while f.read(1 << 20):
                    pass
        return r


def tar_of(d: str, dest: str) -> str:
    """Tar a dir as it is (symlinks stay symlinks, fifos stay fifos)."""
    with tarfile.open(dest, "w") as t:
        for name in sorted(os.listdir(d)):
            t.add(os.path.join(d, name), arcname=name)
    return dest


def docker_save_manifest(d: str) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)[0]


def layout_config(d: str) -> str:
    with open(os.path.join(d, "index.json")) as f:
        top = json.load(f)["manifests"][0]["digest"][7:]
    with open(os.path.join(d, "blobs", "sha256", top)) as f:
        return os.path.join(d, "blobs", "sha256", json.load(f)["config"]["digest"][7:])


def layout_layer(d: str) -> str:
    with open(os.path.join(d, "index.json")) as f:
        top = json.load(f)["manifests"][0]["digest"][7:]
    with open(os.path.join(d, "blobs", "sha256", top)) as f:
        return os.path.join(d, "blobs", "sha256", json.load(f)["layers"][0]["digest"][7:])


def make(tmp_path, form: str, harm) -> str:
    """An image of ``form`` after ``harm(dir, config_path, layer_path)`` changed its files."""
    if form.startswith("layout"):
        d = layout_dir(tmp_path)
        cfg, layer = layout_config(d), layout_layer(d)
    else:
        d = save_dir(tmp_path)
        m = docker_save_manifest(d)
        cfg, layer = os.path.join(d, m["Config"]), os.path.join(d, m["Layers"][0])
    harm(d, cfg, layer)
    if form.endswith("tar"):
        return tar_of(d, str(tmp_path / "image.tar"))
    return d


def test_every_form_imports_when_clean(tmp_path):
    for form in FORMS:
        sub = tmp_path / form
        sub.mkdir()
        r = resolve_and_read(make(sub, form, lambda *a: None))
        assert r.runtime_config["Env"] == ["PATH=/bin"] and len(r.layers) == 2


@pytest.mark.parametrize("form", FORMS)
def test_symlinked_config_is_refused(tmp_path, form, secret):
    def harm(d, cfg, layer):
        os.unlink(cfg)
        os.symlink(secret, cfg)
    with pytest.raises(InvalidInput, match="symlink") as e:
        resolve_and_read(make(tmp_path, form, harm))
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("form", FORMS)
def test_symlinked_layer_is_refused(tmp_path, form):
    def harm(d, cfg, layer):
        shutil.copy(layer, tmp_path / "elsewhere")
        os.unlink(layer)
        os.symlink(str(tmp_path / "elsewhere"), layer)
    with pytest.raises(InvalidInput, match="symlink"):
        resolve_and_read(make(tmp_path, form, harm))


@pytest.mark.parametrize("form", FORMS)
def test_layer_linked_to_dev_zero_is_refused(tmp_path, form):
    def harm(d, cfg, layer):
        os.unlink(layer)
        os.symlink("/dev/zero", layer)
    with pytest.raises(InvalidInput, match="symlink"):
        resolve_and_read(make(tmp_path, form, harm))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.timeout(60)
def test_fifo_layer_is_refused_without_blocking(tmp_path, form):
    def harm(d, cfg, layer):
        os.unlink(layer)
        os.mkfifo(layer)
    path = make(tmp_path, form, harm)
    out = []
    t = threading.Thread(target=lambda: out.append(_error(resolve_and_read, path)), daemon=True)
    t.start()
    t.join(30)  # generous: a refusal takes milliseconds; a hang holds a worker forever
    assert not t.is_alive(), "reading a fifo layer blocked"
    assert isinstance(out[0], InvalidInput) and "fifo" in str(out[0])


@pytest.mark.parametrize("form", ["layout-dir", "save-dir"])
def test_symlinked_directory_on_the_way_is_refused(tmp_path, form):
    def harm(d, cfg, layer):
        parent = os.path.dirname(layer)
        shutil.move(parent, str(tmp_path / "real"))
        os.symlink(str(tmp_path / "real"), parent)
    with pytest.raises(InvalidInput, match="symlink"):
        resolve_and_read(make(tmp_path, form, harm))


def test_hardlink_member_in_a_tar_is_refused(tmp_path):
    d = save_dir(tmp_path)
    m = docker_save_manifest(d)
    with tarfile.open(tmp_path / "image.tar", "w") as t:
        for name in sorted(os.listdir(d)):
            if name != os.path.dirname(m["Layers"][0]):
                t.add(os.path.join(d, name), arcname=name)
        t.add(os.path.join(d, m["Layers"][0]), arcname="real.tar")
        ti = tarfile.TarInfo(m["Layers"][0])
        ti.type, ti.linkname = tarfile.LNKTYPE, "real.tar"
        t.addfile(ti)
    with pytest.raises(InvalidInput, match="hardlink"):
        resolve_and_read(str(tmp_path / "image.tar"))


@pytest.mark.parametrize("form", ["layout-dir", "layout-tar"])
@pytest.mark.parametrize("change", [b"more", None])
def test_blob_longer_or_shorter_than_its_descriptor_is_refused(tmp_path, form, change):
    def harm(d, cfg, layer):
        with open(layer, "r+b") as f:
            if change:
                f.seek(0, 2)
                f.write(change)
            else:
                f.truncate(os.path.getsize(layer) - 1)
    with pytest.raises(InvalidInput, match="descriptor says"):
        resolve_and_read(make(tmp_path, form, harm))


def test_oversized_document_is_refused_before_reading(tmp_path):
    d = layout_dir(tmp_path)
    with open(os.path.join(d, "index.json"), "wb") as f:
        f.write(b" " * (oci.MAX_DOCUMENT + 1))
    with pytest.raises(InvalidInput, match="byte limit"):
        resolve_and_read(d)


def test_source_path_that_is_a_fifo_or_device_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for p in (str(tmp_path / "fifo"), "/dev/zero"):
        with pytest.raises(InvalidInput, match="regular file"):
            oci.open_source(p)


def test_compressed_archive_bomb_and_member_flood_are_refused(tmp_path):
    import gzip
    big = tmp_path / "bomb.tar.gz"
    with gzip.open(big, "wb", 9) as g, tarfile.open(fileobj=g, mode="w|") as t:
        ti = tarfile.TarInfo("index.json")
        ti.size = 64 * 1024 * 1024
        t.addfile(ti, io.BytesIO(bytes(ti.size)))
    with pytest.raises(InvalidInput, match="decompression bomb"):
        oci.open_source(str(big))
    flood = tmp_path / "flood.tar"
    with tarfile.open(flood, "w") as t:
        for i in range(oci.MAX_ARCHIVE_MEMBERS + 1):
            t.addfile(tarfile.TarInfo(f"f{i}"))
    with pytest.raises(InvalidInput, match="members"):
        oci.open_source(str(flood))


def _error(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None
