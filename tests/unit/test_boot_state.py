"""agent.services.boot: a reboot told from an agent restart by the kernel's boot id, and the
starts a reboot leaves pending kept until they were handed out."""
from __future__ import annotations

import pytest

from agent.events import EventBus
from agent.services.boot import BootState
from agent.services.records import InstanceRecords
from tests.unit.test_records import _inst


@pytest.fixture
def records(db):
    return InstanceRecords(db, EventBus())


def _boot(tmp_path, value: str | None):
    path = tmp_path / "boot_id"
    if value is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(value + "\n")
    return str(path)


def test_only_a_new_boot_id_starts_what_ran_with_autostart(db, records, tmp_path):
    records.insert(_inst(1, state="running"))
    records.insert(_inst(2, state="paused"))
    records.insert(_inst(3, state="stopped"))  # an operator stopped it: stays stopped
    records.insert(_inst(4, state="running", spec={"name": "web4", "autostart": False}))
    boot = BootState(db, _boot(tmp_path, "a"))
    assert boot.check(records) == []  # nothing remembered yet: a fresh state dir starts nothing
    assert boot.check(records) == []  # same boot: an agent restart re-adopts only
    _boot(tmp_path, "b")
    assert boot.check(records) == [f"{1:032x}", f"{2:032x}"]
    # the agent dies before handing them out: the next start (same boot now) still has them
    assert BootState(db, boot.path).check(records) == [f"{1:032x}", f"{2:032x}"]
    boot.done(f"{1:032x}")
    boot.done(f"{2:032x}")
    assert boot.check(records) == []


def test_an_unreadable_or_bogus_boot_id_assumes_no_reboot(db, records, tmp_path):
    records.insert(_inst(1, state="running"))
    boot = BootState(db, _boot(tmp_path, "a"))
    boot.check(records)
    _boot(tmp_path, None)
    assert boot.check(records) == []
    _boot(tmp_path, "x" * 4096)  # not a boot id
    assert boot.check(records) == []
    _boot(tmp_path, "a")
    assert boot.check(records) == []  # still the remembered boot
