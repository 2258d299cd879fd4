"""API tests run against a real ``nodeagent serve`` with fake driver kinds."""
from __future__ import annotations

import pytest

from testbed.agentproc import AgentProcess, Api


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    proc = AgentProcess(tmp_path_factory.mktemp("agent"), pool_kind="local")
    proc.admin_token = proc.token("admin", "admin")
    proc.reader_token = proc.token("reader", "reader")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def admin(agent):
    return Api(agent.url, agent.admin_token)


@pytest.fixture
def reader(agent):
    return Api(agent.url, agent.reader_token)


@pytest.fixture
def anon(agent):
    return Api(agent.url)


def assert_error(r, status: int, code: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in r.text
    return body["error"]


@pytest.fixture(scope="session")
def images(agent, tmp_path_factory):
    """A container image (busybox OCI layout) and a VM image (small qcow2), imported once."""
    import subprocess

    from testbed.ocibuild import busybox_layers, write_layout

    d = tmp_path_factory.mktemp("images")
    layout = write_layout(str(d / "busybox"), {"latest": busybox_layers()})
    disk = d / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    api = Api(agent.url, agent.admin_token)
    out = {}
    for key, body in (("container", {"name": "busybox", "source": {"type": "file", "path": layout},
                                     "format": "oci"}),
                      ("vm", {"name": "tiny-vm", "source": {"type": "file", "path": str(disk)}})):
        r = api.post("/v1/images", json=body)
        assert r.status_code == 202, r.text
        op = api.wait(r.json())
        assert op["status"] == "succeeded", op
        out[key] = op["result"]["image"]
    return out
