"""containers.bandwidth without tc: bounds, bursts, names."""
import pytest

from agent.errors import InvalidInput
from containers.bandwidth import MAX_BURST_KBIT, Bandwidth, _kbit, apply, clear, ifb_name


def test_bounds_and_burst_rules():
    assert Bandwidth(8000, 4000, 512).check().limited and not Bandwidth().limited
    for bad in (Bandwidth(63), Bandwidth(egress_kbit=10**9), Bandwidth(8000, burst_kbit=8),
                Bandwidth(8000, burst_kbit=MAX_BURST_KBIT + 1), Bandwidth(burst_kbit=1000),
                Bandwidth(True), Bandwidth("8000")):
        with pytest.raises(InvalidInput, match="bandwidth"):
            bad.check()


def test_burst_defaults_to_50ms_and_is_cut_to_10s_of_traffic():
    assert Bandwidth(8000).burst_for(8000) == 400
    assert Bandwidth(64).burst_for(64) == 128  # at least 16 KB
    assert Bandwidth(64, burst_kbit=1_000_000).burst_for(64) == 640  # tbf would wrap a larger bucket
    assert Bandwidth(10**6, burst_kbit=2000).burst_for(10**6) == 2000
    assert Bandwidth.from_dict(Bandwidth(1, 2, 3).to_dict()) == Bandwidth(1, 2, 3)
    assert Bandwidth.from_dict(None) == Bandwidth()


def test_ifb_names_fit_the_kernels_limit_and_tc_rates_parse():
    assert len(ifb_name("x" * 15)) <= 15 and ifb_name("a") != ifb_name("b") and ifb_name("a").startswith("nbw")
    assert [_kbit(t) for t in ("8Mbit", "640Kbit", "1Gbit", "999bit", "2500kbit")] == [8000, 640, 1000000, 1, 2500]


def test_a_device_name_that_could_smuggle_tc_commands_is_refused_before_tc_runs():
    for bad in ("vnet0\nqdisc del dev eth0 root", "a b", "", "x" * 16, "../x"):
        with pytest.raises(InvalidInput, match="device name"):
            apply(bad, Bandwidth(8000))
        with pytest.raises(InvalidInput, match="device name"):
            clear(bad)
