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


def inprocess_app(tmp_path, **config):
    """The agent in-process (Flask test client, no server) on the fake driver and runtime and
    a real local pool, started, with the 16 MiB qcow2 image "tiny-vm" imported; (app, admin
    client, root). ``config`` adds top-level keys. The caller stops ``root``."""
    import subprocess

    from agent import config as agent_config
    from agent.app import create_app
    cfg = agent_config.parse({"state_dir": str(tmp_path / "state"), "workers": 2,
                              "hypervisor": {"driver": "fake"}, "containers": {"runtime": "fake"},
                              "images": {"import_dirs": [str(tmp_path)]},
                              "pools": {"default": {"kind": "local", "path": str(tmp_path / "pool")}}, **config})
    app = create_app(cfg)
    root = app.config["SERVICES"]
    root.start()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('admin', 'admin')}"
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    op = client.post("/v1/images", json={"name": "tiny-vm", "source": {"type": "file", "path": str(disk)}}).json
    op = client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json
    assert op["status"] == "succeeded", op
    return app, client, root
