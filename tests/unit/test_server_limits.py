"""The agent keeps descriptors for its own work: the open-files limit is raised to fit
api.max_connections, or the connections are capped below it (run in a child: rlimits are
per process)."""
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys
from agent.config import ApiConfig
from agent.server import fit_connections
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
api = fit_connections(ApiConfig())
print(json.dumps({"max": api.max_connections, "per": api.max_connections_per_client,
                  "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
'''


def _fit(soft, hard):
    out = subprocess.run([sys.executable, "-c", CHILD, str(soft), str(hard)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_the_soft_limit_is_raised_to_fit_the_connections():
    got = _fit(1024, 8192)
    assert got == {"max": 4096, "per": 256, "soft": 4096 + 1024}


def test_connections_are_capped_below_a_low_hard_limit():
    got = _fit(1500, 1500)
    assert got["soft"] == 1500 and got["max"] == 1500 - 1024 and got["per"] == 256
