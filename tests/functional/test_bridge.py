"""The host bridge of [network]: made once per process, made again when it went missing."""
from __future__ import annotations

import subprocess

import pytest

from containers.network import NAT_CHAIN, Network, rules_with_comment
from testbed import runtimes

pytestmark = pytest.mark.real


def test_ready_bridge_makes_the_bridge_once_and_again_when_it_went_missing(db):
    n = Network(db, bridge=runtimes.test_network()[0], subnet="198.19.254.0/24", nat=False,
                rtag=runtimes.test_rtag())
    try:
        n.ready_bridge()
        assert "198.19.254.1/24" in subprocess.run(["ip", "-br", "addr", "show", n.bridge],
                                                   capture_output=True, text=True, check=True).stdout
        assert rules_with_comment("nat", NAT_CHAIN, f"nodeagent:{n.rtag}:net:{n.bridge}", exact=True)
        subprocess.run(["ip", "link", "del", n.bridge], check=True)  # removed behind the agent's back
        n.ready_bridge()
        assert "198.19.254.1/24" in subprocess.run(["ip", "-br", "addr", "show", n.bridge],
                                                   capture_output=True, text=True, check=True).stdout
    finally:
        n.delete_bridge()
        runtimes.drop_test_network(n.bridge, n.rtag)
    assert not rules_with_comment("nat", NAT_CHAIN, f"nodeagent:{n.rtag}:net:{n.bridge}", exact=True)
