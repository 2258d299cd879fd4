"""Build OCI image layouts, archives and `docker save` tars for tests (no network)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

BUSYBOX = "/bin/busybox"  # Debian busybox-static


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(members, compress=True) -> bytes:
    """members: (name, kind, data_or_target[, mode[, uid, gid[, xattrs]]]) with kind
    file|dir|sym; ``xattrs``: {name: bytes} (as GNU tar --xattrs writes them, PAX headers)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, val, *rest in members:
            ti = tarfile.TarInfo(name)
            ti.mode = rest[0] if rest else (0o755 if kind == "dir" else 0o644)
            if len(rest) >= 3:
                ti.uid, ti.gid = rest[1], rest[2]
            if len(rest) >= 4:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in rest[3].items()}
            if kind == "file":
                ti.size = len(val)
                t.addfile(ti, io.BytesIO(val))
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            else:
                ti.type, ti.linkname = tarfile.SYMTYPE, val
                t.addfile(ti)
    raw = buf.getvalue()
    return gzip.compress(raw, 1, mtime=0) if compress else raw


def busybox_layers() -> list[bytes]:
    """Two layers: busybox + /etc/hello + /etc/keep, then a whiteout of /etc/hello."""
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    base = layer([("bin/", "dir", None), ("bin/busybox", "file", bb, 0o755),
                  ("bin/sh", "sym", "/bin/busybox"), ("etc/", "dir", None),
                  ("etc/hello", "file", b"hello\n"), ("etc/keep", "file", b"keep\n"),
                  ("var/", "dir", None), ("var/old", "file", b"old\n")])
    top = layer([("etc/.wh.hello", "file", b""), ("etc/new", "file", b"new\n"),
                 ("var/.wh..wh..opq", "file", b""), ("var/fresh", "file", b"fresh\n")])
    return [base, top]


def users_layer(passwd: str, group: str) -> bytes:
    """A layer over busybox_layers(): /etc/passwd, /etc/group and an ``id`` applet."""
    return layer([("bin/", "dir", None), ("bin/id", "sym", "busybox"), ("etc/", "dir", None),
                  ("etc/passwd", "file", passwd.encode()), ("etc/group", "file", group.encode())])


def image_blobs(layers, *, arch="amd64", cmd=("/bin/sh",), env=("PATH=/bin",), entrypoint=None,
                user=None):
    """Return (manifest_bytes, {digest: bytes}) for an image made of ``layers``; the image
    config has Entrypoint and User only when given."""
    process = {"Cmd": list(cmd), "Env": list(env), "WorkingDir": "/"}
    if entrypoint is not None:
        process["Entrypoint"] = list(entrypoint)
    if user is not None:
        process["User"] = user
    config = json.dumps({"architecture": arch, "os": "linux", "config": process,
                         "rootfs": {"type": "layers", "diff_ids": [
                             sha(gzip.decompress(l)) for l in layers]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(l), "size": len(l)} for l in layers]}).encode()
    blobs = {sha(config): config, sha(manifest): manifest}
    blobs.update({sha(l): l for l in layers})
    return manifest, blobs


def write_layout(dest, images: dict, *, multiarch=False, arm64_blobs=False, **config) -> str:
    """images: tag -> list of layers; ``config``: image_blobs' cmd/env/entrypoint/user. With ``multiarch``
    each tag names an index of an arm64 manifest and the amd64 one; the arm64 image's
    blobs are written only with ``arm64_blobs`` (a registry push of --all needs them)."""
    os.makedirs(os.path.join(dest, "blobs", "sha256"), exist_ok=True)

    def put(blobs):
        for d, data in blobs.items():
            with open(os.path.join(dest, "blobs", "sha256", d[7:]), "wb") as f:
                f.write(data)

    entries = []
    for tag, layers in images.items():
        manifest, blobs = image_blobs(layers, **config)
        put(blobs)
        desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha(manifest), "size": len(manifest)}
        if multiarch:
            arm_manifest, arm_blobs = image_blobs(layers, arch="arm64", **config)
            if arm64_blobs:
                put(arm_blobs)
            arm = {"mediaType": desc["mediaType"], "digest": sha(arm_manifest),
                   "size": len(arm_manifest), "platform": {"os": "linux", "architecture": "arm64"}}
            index = json.dumps({"schemaVersion": 2,
                                "mediaType": "application/vnd.oci.image.index.v1+json",
                                "manifests": [arm, dict(desc, platform={
                                    "os": "linux", "architecture": "amd64"})]}).encode()
            put({sha(index): index})
            desc = {"mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": sha(index), "size": len(index)}
        entries.append(dict(desc, annotations={"org.opencontainers.image.ref.name": tag}))
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": entries}, f)
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    return dest


def tar_dir(src_dir, dest_tar) -> str:
    with tarfile.open(dest_tar, "w") as t:
        for name in sorted(os.listdir(src_dir)):
            t.add(os.path.join(src_dir, name), arcname=name)
    return dest_tar


def write_docker_save(dest_tar, layers, tag="busybox:latest") -> str:
    """A `docker save` archive: <id>/layer.tar (uncompressed), <config>.json, manifest.json."""
    plain = [gzip.decompress(l) for l in layers]
    _, blobs = image_blobs(layers)
    config = next(b for b in blobs.values() if b"rootfs" in b)
    cfg_name = sha(config)[7:] + ".json"
    files = {cfg_name: config}
    names = []
    for i, l in enumerate(plain):
        n = f"{hashlib.sha256(l).hexdigest()}/layer.tar"
        files[n] = l
        names.append(n)
    files["manifest.json"] = json.dumps([{"Config": cfg_name, "RepoTags": [tag],
                                          "Layers": names}]).encode()
    with tarfile.open(dest_tar, "w") as t:
        for n, data in files.items():
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return dest_tar
