"""NBD exports through the API (the fake driver and runtime, a real local pool and real
qemu-storage-daemon exports read by qemu-img over TLS PSK): create/list/show/delete, who may
see what, the rules around volumes in use, and exports that outlive the agent."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.api.conftest import inprocess_app
from tests.api.test_services_inprocess import _import
from tests.api.test_volumes import _err
from testbed.ocibuild import busybox_layers, write_layout

pytestmark = pytest.mark.real
MiB = 1024 * 1024
PATTERN_AT = 3 * MiB  # where the test writes its bytes into the volume


@pytest.fixture
def app(tmp_path):
    app, client, root = inprocess_app(tmp_path)
    layout = write_layout(str(tmp_path / "busybox"), {"latest": busybox_layers()})
    _import(client, {"name": "busybox", "source": {"type": "file", "path": layout}, "format": "oci"})
    yield app, client, root
    for e in root.exports.nbd.list():  # the daemons are ours: stop them
        root.exports.nbd.delete(e.name)
    root.stop()


def _wait(client, r):
    assert r.status_code == 202, r.json
    op = client.get(f"/v1/operations/{r.json['id']}/wait?timeout=30").json
    assert op["status"] == "succeeded", op
    return op["result"]


def _key_dir(tmp_path, export: dict, key: str | None = None):
    d = tmp_path / f"psk-{export['name']}-{os.urandom(3).hex()}"
    d.mkdir(mode=0o700)
    (d / "keys.psk").write_text(f"{export['psk']['identity']}:{key or export['psk']['key']}\n")
    return d


def _client_args(export: dict, key_dir) -> list[str]:
    """qemu-img's arguments for an export: TLS PSK credentials, then the NBD image options."""
    return ["--object", f"tls-creds-psk,id=tls0,dir={key_dir},endpoint=client,username={export['name']}",
            "--image-opts", f"driver={export['format']},file.driver=nbd,file.server.type=inet,"
                            f"file.server.host={export['host']},file.server.port={export['port']},"
                            f"file.export={export['name']},file.tls-creds=tls0"]


def _listening(host: str, port: int) -> bool:
    import socket
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _volume_file(root, vol: dict) -> str:
    return root.pools["default"].get_volume("v-" + vol["id"][:12]).path


def test_export_a_volume_read_it_over_tls_psk_a_wrong_key_is_refused(app, tmp_path):
    _, client, root = app
    vol = client.post("/v1/volumes", json={"name": "data1", "size_mib": 16}).json
    pattern = os.urandom(64 * 1024)
    with open(_volume_file(root, vol), "r+b") as f:
        f.seek(PATTERN_AT)
        f.write(pattern)
    with root.events.subscribe({"export"}) as sub:
        r = client.post("/v1/exports", json={"volume": "data1", "readonly": True})
        assert r.status_code == 201, r.json
        e = r.json
        assert e["name"] == "data1" and e["volume"] == vol["id"] and e["readonly"] and e["tls"] == "psk"
        assert e["host"] == "127.0.0.1" and e["uri"] == f"nbd://127.0.0.1:{e['port']}/data1"
        assert e["psk"]["identity"] == "data1" and len(e["psk"]["key"]) == 64
        ev = sub.get(5)
        assert ev["data"]["name"] == "data1" and ev["data"]["change"] == "created"
        assert e["psk"]["key"] not in str(ev)
    # qemu-img reads it with the key
    info = subprocess.run(["qemu-img", "info", "--output=json", *_client_args(e, _key_dir(tmp_path, e))],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and '"virtual-size": 16777216' in info.stdout, info
    out = tmp_path / "copy.raw"
    conv = subprocess.run(["qemu-img", "convert", "-O", "raw", *_client_args(e, _key_dir(tmp_path, e)), str(out)],
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv
    with open(out, "rb") as f:
        f.seek(PATTERN_AT)
        assert f.read(len(pattern)) == pattern
    # a wrong key, and no TLS at all, are refused
    wrong = subprocess.run(["qemu-img", "info", *_client_args(e, _key_dir(tmp_path, e, "00" * 32))],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "virtual size" not in wrong.stdout, wrong
    plain = subprocess.run(["qemu-img", "info", "-f", "raw", e["uri"]], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0, plain
    # the key is in the create's answer only
    listed = client.get("/v1/exports").json["exports"]
    assert [x["name"] for x in listed] == ["data1"] and "psk" not in listed[0]
    shown = client.get("/v1/exports/data1").json
    assert "psk" not in shown and e["psk"]["key"] not in str(shown)
    # readers see no export at all (it hands out a disk)
    reader = app[0].test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('r1', 'reader')}"
    for r in (reader.get("/v1/exports"), reader.get("/v1/exports/data1"),
              reader.post("/v1/exports", json={"volume": "data1", "readonly": True, "name": "x"}),
              reader.delete("/v1/exports/data1")):
        assert r.status_code == 403, r.json
    # an exported volume is neither deleted nor grown; a read-write export needs it alone
    _err(client.delete("/v1/volumes/data1"), 409, "DELETE /v1/exports")
    _err(client.patch("/v1/volumes/data1", json={"size_mib": 32}), 409, "exported")
    _err(client.post("/v1/exports", json={"volume": "data1", "name": "data1-rw"}), 409, "alone")
    _err(client.post("/v1/exports", json={"volume": "data1", "readonly": True}), 409, "already exists")
    assert client.delete("/v1/exports/data1").json == {"deleted": True}
    _err(client.get("/v1/exports/data1"), 404)
    _err(client.delete("/v1/exports/data1"), 404)
    assert subprocess.run(["qemu-img", "info", *_client_args(e, _key_dir(tmp_path, e))],
                          capture_output=True, timeout=60).returncode != 0  # gone
    assert client.delete("/v1/volumes/data1").json == {"deleted": True}


BAD_CREATES = [
    ({}, 422, "exactly one"),
    ({"volume": "a", "image": "b", "readonly": True}, 422, "exactly one"),
    ({"image": "tiny-vm"}, 422, "read-only"),
    ({"volume": "nope"}, 404, "nope"),
    ({"image": "nope", "readonly": True}, 404, "nope"),
    ({"image": "busybox", "readonly": True}, 422, "container image"),
    ({"volume": "v1", "name": "../x"}, 422, "name"),
    ({"volume": "v1", "name": "a,b"}, 422, "name"),
    ({"volume": "v1", "readonly": "yes"}, 422, "readonly"),
]


def test_bad_creates_leave_nothing(app):
    _, client, root = app
    client.post("/v1/volumes", json={"name": "v1", "size_mib": 16})
    for body, status, word in BAD_CREATES:
        _err(client.post("/v1/exports", json=body), status, word)
        assert client.get("/v1/exports").json == {"exports": []}
        assert not [p for p in os.listdir(root.config.state_path / "nbd") if p.startswith("nbd-")]
    _err(client.get("/v1/exports/a..b"), 400)


def test_volumes_in_use_images_and_exports_that_outlive_the_agent(app, tmp_path):
    _, client, root = app
    client.post("/v1/volumes", json={"name": "cvol", "size_mib": 16})
    _wait(client, client.post("/v1/instances", json={"name": "c1", "kind": "container", "image": "busybox",
                                                     "command": ["sleep", "60"],
                                                     "volumes": [{"volume": "cvol", "path": "/data"}]}))
    # attached to a running container: read-only only (a raw volume may be read while written)
    _err(client.post("/v1/exports", json={"volume": "cvol"}), 409, "running")
    ro = client.post("/v1/exports", json={"volume": "cvol", "readonly": True, "name": "cvol-ro"})
    assert ro.status_code == 201, ro.json
    assert client.delete("/v1/exports/cvol-ro").status_code == 200
    # stopped: read-write, and then the container does not start, nor does the volume move
    _wait(client, client.post("/v1/instances/c1/actions", json={"action": "stop"}))
    rw = client.post("/v1/exports", json={"volume": "cvol"})
    assert rw.status_code == 201, rw.json
    _err(client.post("/v1/instances/c1/actions", json={"action": "start"}), 409, "second writer")
    _err(client.post("/v1/exports", json={"volume": "cvol", "readonly": True, "name": "again"}), 409,
         "read-write export")
    # a VM image, read-only; the image is not deleted while exported
    img = client.post("/v1/exports", json={"image": "tiny-vm", "readonly": True})
    assert img.status_code == 201, img.json
    img = img.json
    assert img["name"].startswith("image-") and img["format"] == "raw" and img["readonly"]
    _err(client.delete("/v1/images/tiny-vm"), 409, "exported")
    # the agent goes away and comes back: the exports are adopted, their daemons untouched
    from agent import config as agent_config
    from agent.services import Services
    before = {e.name: e.pid for e in root.exports.nbd.list()}
    assert Services(root.config).exports.recover()["adopted"] == sorted(before)
    assert {e.name: e.pid for e in root.exports.nbd.list()} == before
    # a host reboot ended a daemon: it is started again, same port and key
    os.kill(before[img["name"]], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{before[img['name']]}") and time.monotonic() < deadline:
        try:
            os.waitpid(before[img["name"]], os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.05)
    out = Services(root.config).exports.recover()
    assert out["restarted"] == [img["name"]] and out["adopted"] == ["cvol"], out
    again = client.get(f"/v1/exports/{img['name']}").json
    assert again["port"] == img["port"]
    info = subprocess.run(["qemu-img", "info", *_client_args(img, _key_dir(tmp_path, img))],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "16 MiB" in info.stdout, info
    # [nbd] host changed while the agent was down: the export moves there, with its key
    moved = Services(agent_config.parse({**root.config.model_dump(), "nbd": {"host": "127.0.0.2"}}))
    assert moved.exports.recover()["restarted"] == sorted(before)
    e = moved.exports.get(img["name"])
    assert e["host"] == "127.0.0.2" and e["uri"].startswith("nbd://127.0.0.2:")
    info = subprocess.run(["qemu-img", "info", *_client_args({**img, **e}, _key_dir(tmp_path, img))],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "16 MiB" in info.stdout, info
    assert _listening("127.0.0.2", e["port"]) and not _listening("127.0.0.1", img["port"]), "moved, not doubled"
    # deleted exports free the image and the volume
    for name in (img["name"], "cvol"):
        assert client.delete(f"/v1/exports/{name}").status_code == 200
    _wait(client, client.post("/v1/instances/c1/actions", json={"action": "start"}))


def test_cli_exports_outlive_a_killed_agent(tmp_path):
    """A real `nodeagent serve`: the CLI exports a volume (the key written to --psk-dir), the
    agent is killed with SIGKILL and started again, and the export still serves the same
    client with the same daemon; then the CLI deletes it."""
    import json

    from testbed.agentproc import AgentProcess
    agent = AgentProcess(tmp_path / "agent", pool_kind="local")
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.token("admin", "admin")}
    agent.start()
    try:
        agent.cli("volume", "create", "clivol", "--size", "16M", env=env)
        keys = tmp_path / "keys"
        out = agent.cli("export", "create", "--volume", "clivol", "--psk-dir", str(keys), env=env).stdout
        assert out.startswith("clivol nbd://127.0.0.1:") and "read-write" in out and "keys.psk" in out, out
        assert oct((keys / "keys.psk").stat().st_mode & 0o777) == "0o600"
        e = json.loads(agent.cli("export", "show", "clivol", "--json", env=env).stdout)
        assert "psk" not in e
        e["psk"] = {"identity": "clivol"}
        args = _client_args(e, keys)
        w = subprocess.run(["qemu-io", "-c", "write -P 0x6b 1M 64k", *args], capture_output=True, text=True,
                           timeout=60)
        assert w.returncode == 0 and "wrote 65536" in w.stdout, w
        agent.kill9()
        agent.start()
        assert [x["name"] for x in json.loads(agent.cli("export", "list", "--json", env=env).stdout)["exports"]
                ] == ["clivol"]
        again = json.loads(agent.cli("export", "show", "clivol", "--json", env=env).stdout)
        assert again["port"] == e["port"] and again["created_at"] == e["created_at"]
        r = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x6b 1M 64k", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r
        bad = agent.cli("volume", "delete", "clivol", env=env, check=False)
        assert bad.returncode != 0 and "exported" in bad.stderr
        assert agent.cli("export", "delete", "clivol", env=env).stdout.strip() == "deleted clivol"
        assert json.loads(agent.cli("export", "list", "--json", env=env).stdout) == {"exports": []}
    finally:
        for x in json.loads(agent.cli("export", "list", "--json", env=env, check=False).stdout or '{"exports":[]}'
                            )["exports"]:
            agent.cli("export", "delete", x["name"], env=env, check=False)
        agent.stop()
