"""block/object pools build from their TOML keys without touching the network."""
import tomllib

import pytest

from agent import registry
from agent.errors import InvalidInput

POOLS = """
[pools.ceph]
kind = "block"
pool = "rbd"
conf = "/etc/ceph/ceph.conf"
user = "nodeagent"
keyring = "/etc/ceph/ceph.client.nodeagent.keyring"

[pools.images]
kind = "object"
endpoint = "https://s3.example.internal"
bucket = "nodeagent-images"
access_key = "AKIAEXAMPLE"
secret_key = "secret"
region = "us-east-1"
part_size = 67108864
concurrency = 8
verify = true
"""


def test_pools_from_toml():
    pools = tomllib.loads(POOLS)["pools"]
    built = {}
    for name, opts in pools.items():
        opts = dict(opts)
        built[name] = registry.load("backend", opts.pop("kind"))(name, **opts)
    assert (built["ceph"].kind, built["ceph"].pool, built["ceph"].user) == ("block", "rbd",
                                                                          "nodeagent")
    assert built["ceph"].supports_volumes is True
    assert (built["images"].kind, built["images"].supports_volumes) == ("object", False)
    assert built["images"].part_size == 64 << 20


def test_object_pool_rejects_tiny_parts():
    cls = registry.load("backend", "object")
    with pytest.raises(InvalidInput, match="5 MiB"):
        cls("o", endpoint="http://x", bucket="b", access_key="a", secret_key="s", part_size=1)
