"""The agent keeps descriptors for its own work: the open-files limit is raised to fit
api.max_connections, or the connections are capped below it (run in a child: rlimits are
per process)."""
import json
import os
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


ARENAS = r'''
import ctypes, os, sys, tempfile, threading
from agent.server import limit_malloc_arenas
print(limit_malloc_arenas())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def churn():  # ctypes calls drop the GIL: the threads malloc at the same time
    for _ in range(20000):
        libc.free(libc.malloc(1000))
ts = [threading.Thread(target=churn) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
os.unlink(path)
'''


def test_malloc_arenas_are_capped_before_threads_start():
    """Threads allocating at once share at most MALLOC_ARENAS arenas (not 8 per core, each
    keeping what it freed: the agent's RSS under a create storm); $MALLOC_ARENA_MAX wins."""
    import subprocess
    import sys
    from agent.server import MALLOC_ARENAS
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", ARENAS], capture_output=True, text=True, env=env, check=True)
    applied, heaps = out.stdout.split()
    assert applied == "True" and 1 <= int(heaps) <= MALLOC_ARENAS
    out = subprocess.run([sys.executable, "-c", ARENAS], capture_output=True, text=True,
                         env={**env, "MALLOC_ARENA_MAX": "1"}, check=True)
    assert out.stdout.split() == ["False", "1"]
