"""Layer unpacking is the security boundary: one crafted tar per malicious case."""
from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile

import pytest

from agent.errors import InvalidInput
from storage.unpack import layer_dir, unpack_layer, unpack_layer_once

DIGEST = "sha256:" + "ab" * 32


def make_tar(path, members, compress=None):
    """members: (name, kind, extra) with kind file|dir|sym|link|chr|blk|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, *extra in members:
            ti = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = extra[0] if extra else b"data"
                ti.size = len(data)
                ti.mode = extra[1] if len(extra) > 1 else 0o644
            elif kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, extra[0]
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, extra[0]
            else:
                ti.type = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                           "fifo": tarfile.FIFOTYPE}[kind]
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compress == "gzip":
        raw = gzip.compress(raw, 6)
    elif compress == "zstd":
        raw = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True,
                             check=True).stdout
    with open(path, "wb") as f:
        f.write(raw)
    return str(path)


@pytest.fixture
def env(tmp_path):
    host = tmp_path / "host"  # stands for the rest of the host: must stay untouched
    host.mkdir()
    (host / "secret").write_text("host secret")
    cache = tmp_path / "cache"
    return tmp_path, host, cache


def snapshot(d):
    return sorted((r, tuple(sorted(ds)), tuple(sorted(fs))) for r, ds, fs in os.walk(d))


def refuse(env, members, match, compress=None, **kw):
    """The layer is refused, its temp dir is gone and nothing else changed."""
    tmp, host, cache = env
    src = make_tar(tmp / "layer.tar", members, compress)
    before = snapshot(tmp)
    with pytest.raises(InvalidInput, match=match):
        unpack_layer_once(src, DIGEST, str(cache), **kw)
    assert os.listdir(os.path.dirname(layer_dir(str(cache), DIGEST))) == []
    outside = [s for s in snapshot(tmp) if not s[0].startswith(str(cache))]
    assert outside[1:] == before[1:]
    assert set(outside[0][1]) - set(before[0][1]) <= {"cache"}
    assert (host / "secret").read_text() == "host secret"


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_good_layer(env, compress):
    tmp, host, cache = env
    src = make_tar(tmp / "l.tar", [
        ("./", "dir"), ("bin/", "dir"), ("bin/busybox", "file", b"#!bb", 0o755),
        ("bin/sh", "sym", "/bin/busybox"), ("bin/ls", "sym", "busybox"),
        ("bin/hard", "link", "bin/busybox"), ("etc/motd", "file", b"hi"),
        ("etc/.wh.gone", "file", b""), ("var/.wh..wh..opq", "file", b""),
        ("lib", "sym", "usr/lib"), ("usr/lib/", "dir"),
    ], compress)
    d = unpack_layer_once(src, DIGEST, str(cache))
    assert d == layer_dir(str(cache), DIGEST) and os.path.isdir(d)
    assert open(f"{d}/bin/busybox", "rb").read() == b"#!bb"
    assert os.readlink(f"{d}/bin/sh") == "/bin/busybox"
    assert os.stat(f"{d}/bin/hard").st_ino == os.stat(f"{d}/bin/busybox").st_ino
    st = os.lstat(f"{d}/etc/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert not os.path.lexists(f"{d}/etc/.wh.gone")
    assert os.getxattr(f"{d}/var", "trusted.overlay.opaque") == b"y"
    assert not os.path.lexists(f"{d}/var/.wh..wh..opq")
    assert unpack_layer_once(src, DIGEST, str(cache)) == d  # once per digest
    assert os.listdir(os.path.dirname(d)) == [os.path.basename(d)]


def test_dotdot_path(env):
    refuse(env, [("a/../../evil", "file")], r"'\.\.'")


def test_absolute_path(env):
    _, host, _ = env
    refuse(env, [(str(host / "evil"), "file")], "absolute path")


def test_relative_symlink_out_of_root(env):
    refuse(env, [("a/b/link", "sym", "../../../host/secret")], "out of the layer root")


def test_absolute_symlink_climbing_out(env):
    refuse(env, [("link", "sym", "/../../etc/passwd")], "out of the layer root")


def test_absolute_symlink_is_kept_rooted_and_never_followed(env):
    tmp, host, cache = env
    src = make_tar(tmp / "l.tar", [("etc", "sym", str(host))])
    d = unpack_layer_once(src, DIGEST, str(cache))
    assert os.readlink(f"{d}/etc") == str(host)  # rooted at the layer, not resolved


def test_write_through_symlink(env):
    _, host, _ = env
    refuse(env, [("etc", "sym", str(host)), ("etc/pwned", "file", b"x")], "through the symlink")


def test_write_through_relative_symlink_inside_then_out(env):
    refuse(env, [("a/", "dir"), ("a/up", "sym", ".."), ("a/up/up", "sym", ".."),
                 ("a/up/up/x", "file")], "out of the layer root|through the symlink")


def test_replacing_a_symlink_does_not_write_through_it(env):
    tmp, host, cache = env
    src = make_tar(tmp / "l.tar", [("s", "sym", str(host / "secret")), ("s", "file", b"new")])
    d = unpack_layer_once(src, DIGEST, str(cache))
    assert open(f"{d}/s").read() == "new" and not os.path.islink(f"{d}/s")
    assert (host / "secret").read_text() == "host secret"


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "missing/file"])
def test_hardlink_out_of_layer(env, target):
    refuse(env, [("h", "link", target)], "hardlink|absolute|'\\.\\.'")


def test_hardlink_through_symlink(env):
    _, host, _ = env
    refuse(env, [("s", "sym", str(host)), ("h", "link", "s/secret")], "through the symlink")


def test_hardlink_to_directory(env):
    refuse(env, [("d/", "dir"), ("h", "link", "d")], "directory")


@pytest.mark.parametrize("kind", ["chr", "blk", "fifo"])
def test_special_files(env, kind):
    refuse(env, [("dev/x", kind)], "special files")


def test_setuid_and_setgid_are_stripped(env):
    tmp, host, cache = env
    src = make_tar(tmp / "l.tar", [("su", "file", b"x", 0o4755), ("sg", "file", b"x", 0o2755),
                                   ("tmp/", "dir")])
    (tmp / "out").mkdir()
    r = unpack_layer(src, str(tmp / "out"))
    assert r["stripped_setid"] == 2
    assert stat.S_IMODE(os.stat(tmp / "out" / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp / "out" / "sg").st_mode) == 0o755


def test_size_cap(env):
    refuse(env, [("big", "file", b"x" * 100_000)], "bomb", max_bytes=50_000)


def test_ratio_cap_gzip_bomb(env):
    tmp, host, cache = env
    src = make_tar(tmp / "bomb.tar.gz", [("zeros", "file", b"\0" * (20 * 1024 * 1024))], "gzip")
    assert os.path.getsize(src) < 100_000
    with pytest.raises(InvalidInput, match="bomb"):
        unpack_layer_once(src, DIGEST, str(cache), max_ratio=50)
    assert os.listdir(os.path.dirname(layer_dir(str(cache), DIGEST))) == []


def test_many_empty_files_hit_the_ratio_cap(env):
    refuse(env, [(f"f{i}", "file", b"") for i in range(3000)], "bomb", "gzip", max_ratio=5)


def test_not_a_tar_and_truncated(env):
    tmp, _, cache = env
    junk = tmp / "junk"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(InvalidInput):
        unpack_layer_once(str(junk), DIGEST, str(cache))
    good = make_tar(tmp / "g.tar.gz", [("f", "file", os.urandom(200_000))], "gzip")
    cut = tmp / "cut.tar.gz"
    cut.write_bytes(open(good, "rb").read()[:50_000])
    with pytest.raises(InvalidInput):
        unpack_layer_once(str(cut), DIGEST, str(cache))
    assert os.listdir(os.path.dirname(layer_dir(str(cache), DIGEST))) == []


def test_replacing_a_cached_parent_dir_with_a_symlink(env):
    """The extractor caches the last parent dir fd; replacing that dir must not leave a
    stale fd through which later members land outside the new tree."""
    _, host, _ = env
    (host / "b").mkdir()
    refuse(env, [("a/b/f1", "file"), ("a", "sym", str(host)), ("a/b/f2", "file")],
           "through the symlink")
    assert os.listdir(host / "b") == []


def test_replacing_a_dir_with_a_file(env):
    tmp, _, cache = env
    src = make_tar(tmp / "l.tar", [("a/b/f1", "file"), ("a", "file", b"now a file")])
    d = unpack_layer_once(src, DIGEST, str(cache))
    assert open(f"{d}/a").read() == "now a file"
