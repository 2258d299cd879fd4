import os

import pytest

from agent.errors import CommandFailed, InvalidInput
from storage import qemu_img
from storage.units import MiB



def test_create_info_resize_check(tmp_path):
    p = str(tmp_path / "a.qcow2")
    qemu_img.create(p, format="qcow2", size=4 * MiB)
    i = qemu_img.info(p)
    assert i["format"] == "qcow2" and i["virtual-size"] == 4 * MiB
    qemu_img.resize(p, 8 * MiB, format="qcow2")
    assert qemu_img.info(p, format="qcow2")["virtual-size"] == 8 * MiB
    assert qemu_img.check(p)["check-errors"] == 0


def test_overlay_convert_and_rebase(tmp_path):
    base, top, flat = (str(tmp_path / n) for n in ("base.raw", "top.qcow2", "flat.raw"))
    with open(base, "wb") as f:
        f.write(b"A" * MiB)
    qemu_img.create(top, backing=base, backing_format="raw")
    i = qemu_img.info(top)
    assert i["backing-filename"] == base and i["virtual-size"] == MiB
    qemu_img.convert(top, flat, src_format="qcow2", dst_format="raw")
    with open(flat, "rb") as f:
        assert f.read() == b"A" * MiB
    qemu_img.rebase(top, None)
    assert "backing-filename" not in qemu_img.info(top)


def test_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.img")
    with pytest.raises(InvalidInput, match="missing.img"):
        qemu_img.info(missing)
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 100)
    with pytest.raises(InvalidInput, match="bad.qcow2"):
        qemu_img.info(str(bad), format="qcow2")
    with pytest.raises(InvalidInput):
        qemu_img.create(str(tmp_path / "x"), format="qcow2")
    with pytest.raises(CommandFailed):
        qemu_img.create(str(tmp_path / "nodir" / "x.qcow2"), format="qcow2", size=MiB)
    assert not os.path.exists(tmp_path / "x")
