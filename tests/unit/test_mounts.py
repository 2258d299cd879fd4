import os

import pytest

from agent.errors import InvalidInput
from storage import mounts


def test_overlay_stacks_layers_and_writes_to_upper(tmp_path):
    low1, low2, up, work, root = (tmp_path / n for n in ("l1", "l2", "up", "work", "root"))
    for d in (low1, low2, up, work, root):
        d.mkdir()
    (low1 / "top").write_text("l1")
    (low2 / "top").write_text("l2")
    (low2 / "base").write_text("base")
    mounts.mount_overlay([str(low1), str(low2)], str(up), str(work), str(root))
    try:
        assert mounts.is_mounted(str(root))
        assert (root / "top").read_text() == "l1" and (root / "base").read_text() == "base"
        (root / "new").write_text("x")
        assert (up / "new").read_text() == "x" and not (low1 / "new").exists()
        assert mounts.mounts_under(str(tmp_path)) == [str(root)]
    finally:
        assert mounts.unmount(str(root))
    assert not mounts.unmount(str(root))
    assert mounts.mounts_under(str(tmp_path)) == []


def test_overlay_rejects_option_injection(tmp_path):
    with pytest.raises(InvalidInput):
        mounts.mount_overlay([str(tmp_path) + ",upperdir=/etc"], str(tmp_path), str(tmp_path),
                             str(tmp_path))
    assert not os.path.ismount(tmp_path)
