"""cap_add/cap_drop at create: containers only, known names, each once; kept in the record."""
from __future__ import annotations

import pytest

from tests.api.conftest import assert_error

BUSY = {"kind": "container", "image": "busybox", "memory_mib": 64, "command": ["/bin/sh", "-c", "sleep 600"]}


@pytest.mark.parametrize("body, problem", [
    ({"cap_add": ["CAP_EVERYTHING"]}, "cap_add.0"),
    ({"cap_add": ["NET_ADMIN"]}, "cap_add.0"),  # the CAP_ name, as the kernel spells it
    ({"cap_drop": ["CAP_CHOWN", "CAP_CHOWN"]}, "twice"),
    ({"kind": "vm", "image": "tiny-vm", "command": None, "cap_add": ["CAP_NET_ADMIN"]}, "for containers"),
])
def test_bad_capabilities_are_422(admin, images, body, problem):
    err = assert_error(admin.post("/v1/instances", json={**BUSY, "name": "capbad", **body}), 422)
    assert problem in err["message"], err
    assert_error(admin.get("/v1/instances/capbad"), 404)


def test_capabilities_reach_the_runtime_and_the_record(agent, admin, images):
    r = admin.post("/v1/instances", json={**BUSY, "name": "capok", "cap_add": ["CAP_NET_ADMIN"],
                                          "cap_drop": ["CAP_NET_RAW"]})
    assert r.status_code == 202, r.text
    op = admin.wait(r.json())
    assert op["status"] == "succeeded", op
    assert admin.delete("/v1/instances/capok").status_code == 200


def test_cli_passes_capabilities(agent, images):
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    out = agent.cli("instance", "create", "capcli", "--kind", "container", "--image", "busybox", "--memory", "64",
                    "--cap-add", "CAP_NET_ADMIN", "--cap-drop", "ALL", "--", "/bin/sh", "-c", "sleep 100", env=env)
    assert "running" in out.stdout, out
    bad = agent.cli("instance", "create", "capcli2", "--kind", "container", "--image", "busybox",
                    "--cap-add", "SUPERPOWER", env=env, check=False)
    assert bad.returncode != 0 and "cap_add" in bad.stderr and "Traceback" not in bad.stderr
    agent.cli("instance", "rm", "capcli", env=env)
