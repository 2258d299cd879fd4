"""storage/upper.py: a container's upper dir as the source's tar sends it arrives whole (owners,
modes, whiteouts, overlay xattrs, links), and nothing in a stream leaves the destination dir."""
import io
import os
import stat
import subprocess
import tarfile

import pytest

from agent.errors import InvalidInput
from storage.upper import unpack_upper

TAR_C = ["tar", "-c", "--xattrs", "--xattrs-include=trusted.*", "--numeric-owner", "-f", "-"]  # as push_rootfs


def tar_dir(src, newer=None) -> io.BytesIO:
    argv = [*TAR_C[:1], f"--newer=@{newer:.0f}", *TAR_C[1:]] if newer else TAR_C
    return io.BytesIO(subprocess.run([*argv, "-C", str(src), "."], check=True, capture_output=True).stdout)


def make_upper(d):
    (d / "etc").mkdir(parents=True)
    os.setxattr(d / "etc", "trusted.overlay.opaque", b"y")
    os.mknod(d / "etc" / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # a whiteout
    (d / "bin").mkdir()
    (d / "bin" / "su").write_bytes(b"#!/bin/sh\n")
    os.chown(d / "bin" / "su", 1000, 1001)
    os.chmod(d / "bin" / "su", 0o4755)
    os.symlink("/bin/busybox", d / "bin" / "sh")
    os.link(d / "bin" / "su", d / "bin" / "su-again")
    os.mkfifo(d / "pipe", 0o600)
    os.setxattr(d / "bin" / "su", "security.capability", b"\x01\x00\x00\x02" + b"\x00" * 16)


def test_a_real_upper_dir_arrives_whole(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_upper(src)
    dst.mkdir()
    unpack_upper(tar_dir(src), str(dst), max_bytes=1 << 30)
    assert os.getxattr(dst / "etc", "trusted.overlay.opaque") == b"y"
    st = os.lstat(dst / "etc" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    st = os.lstat(dst / "bin" / "su")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (1000, 1001, 0o4755, 2)
    assert "security.capability" not in os.listxattr(dst / "bin" / "su")  # only overlay's own markers
    assert os.readlink(dst / "bin" / "sh") == "/bin/busybox"
    assert stat.S_ISFIFO(os.lstat(dst / "pipe").st_mode)


def test_an_incremental_stream_replaces_what_changed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_upper(src)
    dst.mkdir()
    unpack_upper(tar_dir(src), str(dst), max_bytes=1 << 30)
    os.unlink(src / "bin" / "sh")
    (src / "bin" / "sh").mkdir()
    (src / "bin" / "sh" / "new").write_text("new")
    st = os.stat(src / "bin")
    unpack_upper(tar_dir(src, newer=st.st_mtime - 1), str(dst), max_bytes=1 << 30)
    assert not os.path.islink(dst / "bin" / "sh") and (dst / "bin" / "sh" / "new").read_text() == "new"


def one(**kw) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo(kw.pop("name"))
        data = kw.pop("data", None)
        for k, v in kw.items():
            setattr(ti, k, v)
        if data is not None:
            ti.size = len(data)
        t.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def test_a_link_an_earlier_stream_left_is_never_followed(tmp_path):
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    unpack_upper(one(name="esc", type=tarfile.SYMTYPE, linkname=str(outside)), str(dst), max_bytes=1 << 20)
    with pytest.raises(InvalidInput, match="symlink"):
        unpack_upper(one(name="esc/f", data=b"x"), str(dst), max_bytes=1 << 20)
    assert os.listdir(outside) == []


@pytest.mark.parametrize("member", [
    dict(name="../x", data=b"x"), dict(name="/abs", data=b"x"),
    dict(name="dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    dict(name="blk", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
    dict(name="h", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
    dict(name="s", type=tarfile.SYMTYPE, linkname="../../etc"),
    dict(name="big", data=b"x" * 4096)])
def test_members_that_leave_the_dir_are_devices_or_too_big_are_refused(tmp_path, member):
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(InvalidInput):
        unpack_upper(one(**member), str(dst), max_bytes=2048)
    assert os.listdir(dst) == [] and os.listdir(tmp_path) == ["dst"]
