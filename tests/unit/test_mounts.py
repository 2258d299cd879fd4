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


def test_a_private_view_keeps_one_tree_and_never_touches_the_host(tmp_path):
    """enter_private_view (the containers' monitors start in one): in the thread's new mount
    namespace only the kept dir's mounts remain below the hidden mount point; the process's
    (host's) mounts are all still there, and a mount made in the view never reaches the host."""
    import subprocess
    import threading
    hide = tmp_path / "containers"
    for n in ("a", "b"):
        (hide / n / "root").mkdir(parents=True)
    assert mounts.bind_self(str(hide)) and not mounts.bind_self(str(hide))
    try:
        for n in ("a", "b"):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(hide / n / "root")], check=True)
        (hide / "a" / "root" / "mine").write_text("a")
        seen = {}

        def view():
            mounts.enter_private_view([(str(hide), [str(hide / "a")])])
            seen["points"] = [p for p in subprocess.run(["cat", "/proc/self/mountinfo"], capture_output=True,
                                                        text=True).stdout.split("\n") if str(tmp_path) in p]
            seen["file"] = subprocess.run(["cat", str(hide / "a" / "root" / "mine")], capture_output=True,
                                          text=True).stdout
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(hide / "b")], check=True)

        t = threading.Thread(target=view)
        t.start()
        t.join()
        wrapper = str(tmp_path / "wrapper")  # the same view, made by a process of its own
        mounts.write_view_wrapper(wrapper, "/bin/sh", str(hide), str(tmp_path / "stage"))
        table = subprocess.run([wrapper, "-c", f"cat /proc/self/mountinfo {hide / 'a' / 'root' / 'mine'}",
                                "--bundle", str(hide / "a" / "bundle")], capture_output=True, text=True).stdout
        assert str(hide / "a" / "root") in table and str(hide / "b" / "root") not in table
        assert table.endswith("\na")
        points = [p.split()[4] for p in seen["points"]]
        assert str(hide / "a" / "root") in points and str(hide / "b" / "root") not in points
        assert seen["file"] == "a"
        assert mounts.mounts_under(str(hide)) == [str(hide), str(hide / "a" / "root"), str(hide / "b" / "root")]
        assert not mounts.unbind_self(str(hide))  # busy: mounts below it
    finally:
        for n in ("a", "b"):
            mounts.unmount(str(hide / n / "root"))
        unbound = mounts.unbind_self(str(hide))
    assert unbound and mounts.mounts_under(str(tmp_path)) == []
