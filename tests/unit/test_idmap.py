"""The host's user namespace range: config, /etc/subuid allocation, refusals."""
from __future__ import annotations

import pytest

from agent.errors import InvalidInput, Unsupported
from containers.idmap import host_idmap, parse_idmap
from containers.runtime import IdMap


@pytest.mark.parametrize("text", ["0:65536", "1000:65536", "1000000:100", "x:1", "1000000", "-1:65536",
                                  "4294967000:65536"])
def test_a_range_that_holds_host_users_or_too_few_ids_is_refused(text):
    with pytest.raises(InvalidInput, match="idmap"):
        parse_idmap(text)


def test_the_configured_range_wins_and_touches_no_file(tmp_path):
    assert host_idmap("2000000:65536", subuid=str(tmp_path / "u"), subgid=str(tmp_path / "g")) == \
        IdMap(2000000, 65536)
    assert not (tmp_path / "g").exists()


def test_a_missing_entry_is_allocated_above_every_other_once(tmp_path):
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("alice:100000:65536\nbob:1100000:65536")  # no final newline
    g.write_text("alice:100000:65536\n")
    m = host_idmap(subuid=str(u), subgid=str(g))
    assert m == IdMap(1165536, 65536)
    assert u.read_text().splitlines()[-1] == g.read_text().splitlines()[-1] == "nodeagent:1165536:65536"
    assert host_idmap(subuid=str(u), subgid=str(g)) == m  # found, not allocated again
    assert u.read_text().count("nodeagent") == 1


def test_an_empty_host_gets_the_default_range(tmp_path):
    assert host_idmap(subuid=str(tmp_path / "u"), subgid=str(tmp_path / "g")) == IdMap(1000000, 65536)


def test_different_ranges_in_subuid_and_subgid_are_a_clear_error(tmp_path):
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("nodeagent:1000000:65536\n")
    g.write_text("nodeagent:2000000:65536\n")
    with pytest.raises(Unsupported, match="different ranges"):
        host_idmap(subuid=str(u), subgid=str(g))


def test_shift_owners_maps_through_container_ids():
    from agent.migration.transfer import shift_owners
    a, b = IdMap(1000000, 65536), IdMap(2000000, 65536)
    f = shift_owners(a, b)
    assert [f(x) for x in (1000000, 1000101, 0, 999999, 1065536)] == [2000000, 2000101, 2065534, 2065534, 2065534]
    g = shift_owners(None, b)
    assert [g(x) for x in (0, 101, 65535, 70000)] == [2000000, 2000101, 2065535, 2065534]
    h = shift_owners(a, None)
    assert [h(x) for x in (1000000, 1000101, 5)] == [0, 101, 65534]
    assert shift_owners(None, None) is None
