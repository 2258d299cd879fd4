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


# ------------------------------------------------------------ mode bits (decided)

def test_directories_keep_setgid_and_sticky_files_lose_setuid_and_setgid(env):
    tmp, host, cache = env
    src = make_tar(tmp / "l.tar", [("tmp/", "dir"), ("shared/", "dir"),
                                   ("bin/ping", "file", b"x", 0o4755)])
    with tarfile.open(src) as t:  # give the dirs their bits (make_tar writes 0755)
        members = t.getmembers()
    raw = io.BytesIO()
    with tarfile.open(src) as t, tarfile.open(fileobj=raw, mode="w") as out:
        for m in members:
            m.mode = {"tmp": 0o1777, "shared": 0o2775}.get(m.name, m.mode)
            out.addfile(m, t.extractfile(m) if m.isreg() else None)
    (tmp / "modes.tar").write_bytes(raw.getvalue())
    d = unpack_layer_once(str(tmp / "modes.tar"), DIGEST, str(cache))
    assert stat.S_IMODE(os.stat(f"{d}/tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(f"{d}/shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.stat(f"{d}/bin/ping").st_mode) == 0o755


# ------------------------------------------------------------ audit: more refusals

def test_too_many_entries_is_an_inode_bomb(env):
    refuse(env, [(f"f{i}", "file", b"") for i in range(101)], "inode bomb", max_entries=100)


def test_entry_cap_allows_up_to_the_limit(env):
    tmp, _, cache = env
    src = make_tar(tmp / "l.tar", [(f"f{i}", "file", b"") for i in range(100)])
    d = unpack_layer_once(src, DIGEST, str(cache), max_entries=100)
    assert len(os.listdir(d)) == 100


def test_hardlink_to_a_symlink_links_the_symlink_not_its_target(env):
    tmp, host, cache = env
    src = make_tar(tmp / "l.tar", [("s", "sym", str(host / "secret")), ("h", "link", "s")])
    d = unpack_layer_once(src, DIGEST, str(cache))
    assert os.path.islink(f"{d}/h") and os.readlink(f"{d}/h") == str(host / "secret")
    assert os.lstat(f"{d}/h").st_ino == os.lstat(f"{d}/s").st_ino
    assert os.stat(host / "secret").st_nlink == 1


def test_hardlink_to_a_whiteout_device_is_refused(env):
    refuse(env, [(".wh.gone", "file", b""), ("again", "link", "gone")], "special file")


@pytest.mark.parametrize("name, why", [
    ("a" * 256, "component"), ("d/" * 300 + "f", "deeper"),
    (("x" * 200 + "/") * 21 + "f", "longer"),
])
def test_very_long_or_deep_names_are_refused(env, name, why):
    refuse(env, [(name, "file")], "longer than 4096 bytes, deeper than 256 levels")


def test_very_long_symlink_target_is_refused(env):
    refuse(env, [("s", "sym", "a/" * 2100)], "target is over")


def gnu_tar(env, *args) -> str:
    tmp = env[0]
    src = tmp / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(64 * 1024**3)  # 64 GiB of holes: a tiny tar claiming a huge file
        f.write(b"end")
    out = str(tmp / "holes.tar")
    subprocess.run(["tar", "-C", str(src), "--sparse", *args, "-cf", out, "huge"], check=True)
    os.unlink(src / "huge")
    os.rmdir(src)
    assert os.path.getsize(out) < 1024 * 1024
    return out


@pytest.mark.parametrize("fmt", ["gnu", "posix"])  # old GNU sparse; PAX sparse 1.0
def test_sparse_members_claiming_huge_sizes_are_refused(env, fmt):
    tmp, host, cache = env
    src = gnu_tar(env, f"--format={fmt}")
    with pytest.raises(InvalidInput, match="is a sparse member"):
        unpack_layer_once(src, DIGEST, str(cache))
    assert os.listdir(os.path.dirname(layer_dir(str(cache), DIGEST))) == []


def pax_tar(path, members) -> str:
    """members: (name, pax_headers dict, data)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, pax, data in members:
            ti = tarfile.TarInfo(name)
            ti.pax_headers = pax
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return str(path)


def refuse_file(env, src, match, **kw):
    tmp, host, cache = env
    with pytest.raises(InvalidInput, match=match):
        unpack_layer_once(src, DIGEST, str(cache), **kw)
    assert os.listdir(os.path.dirname(layer_dir(str(cache), DIGEST))) == []
    assert (host / "secret").read_text() == "host secret"


def test_pax_path_with_dotdot_is_refused(env):
    refuse_file(env, pax_tar(env[0] / "l.tar", [("ok", {"path": "../../escape"}, b"x")]),
                "contains '..'")
    assert not (env[0] / "escape").exists()


def test_pax_header_over_the_metadata_cap_is_refused(env):
    src = pax_tar(env[0] / "l.tar", [("f", {"comment": "x" * (2 * 1024 * 1024)}, b"")])
    refuse_file(env, src, "metadata header")


def test_global_pax_key_flood_is_refused(env):
    tmp = env[0]
    with tarfile.open(tmp / "l.tar", "w", format=tarfile.PAX_FORMAT,
                      pax_headers={f"k{i}": "v" for i in range(2000)}) as t:
        t.addfile(tarfile.TarInfo("f"), io.BytesIO(b""))
    refuse_file(env, str(tmp / "l.tar"), "global PAX headers")


def test_pax_header_flood_hits_the_stream_cap(env):
    members = [(f"f{i}", {"comment": "x" * 500_000}, b"") for i in range(4)]
    refuse_file(env, pax_tar(env[0] / "l.tar", members), "decompressed stream",
                max_bytes=200_000)


@pytest.mark.parametrize("pax", [{"uid": str(2**40)}, {"mtime": "1e300"}])
def test_pax_owner_or_time_out_of_range_is_a_clear_refusal(env, pax):
    refuse_file(env, pax_tar(env[0] / "l.tar", [("f", pax, b"x")]), "out of range")


def test_directory_replaced_by_a_symlink_then_written_in_a_later_layer(env):
    """Layers unpack separately; stacked by overlayfs, the later layer's directory hides
    the earlier symlink and nothing is ever written through it on the host."""
    from storage import mounts
    tmp, host, cache = env
    a = unpack_layer_once(make_tar(tmp / "a.tar", [("d/", "dir"), ("d/old", "file")]),
                          "sha256:" + "a1" * 32, str(cache))
    b = unpack_layer_once(make_tar(tmp / "b.tar", [("d", "sym", str(host))]),
                          "sha256:" + "b2" * 32, str(cache))
    c = unpack_layer_once(make_tar(tmp / "c.tar", [("d/x", "file", b"layer c")]),
                          "sha256:" + "c3" * 32, str(cache))
    assert os.path.islink(f"{b}/d") and os.path.isdir(f"{c}/d") and not os.path.islink(f"{c}/d")
    for p in ("upper", "work", "root"):
        (tmp / p).mkdir()
    root = str(tmp / "root")
    mounts.mount_overlay([c, b, a], str(tmp / "upper"), str(tmp / "work"), root)
    try:
        assert not os.path.islink(f"{root}/d") and os.listdir(f"{root}/d") == ["x"]
        with open(f"{root}/d/y", "w") as f:  # a write in the container lands in the upper dir
            f.write("new")
    finally:
        mounts.unmount(root)
    assert sorted(os.listdir(host)) == ["secret"]
    assert os.listdir(tmp / "upper" / "d") == ["y"]


def _cap_layer(path, caps: bytes):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("bin/ping")
        ti.size, ti.mode = 4, 0o755
        ti.pax_headers = {"SCHILY.xattr.security.capability": caps.decode("utf-8", "surrogateescape")}
        t.addfile(ti, io.BytesIO(b"\x7fELF"))
    path.write_bytes(buf.getvalue())
    return str(path)


NET_RAW = 1 << 13


def _vfs_cap(rev: int, permitted: int, rootid: int | None = None, effective=True) -> bytes:
    raw = (rev | int(effective)).to_bytes(4, "little") + permitted.to_bytes(4, "little") + bytes(12)
    return raw + rootid.to_bytes(4, "little") if rootid is not None else raw


@pytest.mark.skipif(os.geteuid() != 0, reason="only root sets security.capability")
@pytest.mark.parametrize("caps", [_vfs_cap(0x02000000, NET_RAW), _vfs_cap(0x03000000, NET_RAW, rootid=0),
                                  _vfs_cap(0x03000000, NET_RAW, rootid=100000)])
def test_file_capabilities_are_kept_as_v2(tmp_path, caps):
    """cap_net_raw+ep survives unpacking in the v2 form (a v3 root id of the build namespace dropped)."""
    src = _cap_layer(tmp_path / "l.tar", caps)
    (tmp_path / "out").mkdir()
    r = unpack_layer(src, str(tmp_path / "out"))
    assert r["file_caps"] == 1
    assert os.getxattr(tmp_path / "out" / "bin" / "ping", "security.capability") == _vfs_cap(0x02000000, NET_RAW)


@pytest.mark.parametrize("caps", [b"", b"\x01\x00\x00\x01" + bytes(8), _vfs_cap(0x02000000, NET_RAW) + b"x",
                                  (0x02000000 | 0x10).to_bytes(4, "little") + bytes(16)])
def test_malformed_file_capabilities_are_refused(tmp_path, caps):
    src = _cap_layer(tmp_path / "l.tar", caps)
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidInput, match="security.capability"):
        unpack_layer(src, str(tmp_path / "out"))
