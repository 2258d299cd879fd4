"""Consoles and interactive exec through a real `nodeagent serve` (fake VM driver, whose
console is a pty that echoes; fake container runtime), with a real websocket client: several
watchers share one console, readers only watch, bad requests get plain 4xx answers."""
from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from testbed.agentproc import Api
from tests.api.conftest import assert_error


def _ws(agent, path, token):
    url = agent.url.replace("http://", "ws://") + path
    return ws_connect(url, additional_headers={"Authorization": f"Bearer {token}"} if token else None,
                      subprotocols=["nodeagent.v1"], open_timeout=10)


def _read_until(c, marker: bytes, seconds: float = 10) -> tuple[bytes, list]:
    got, notices = b"", []
    deadline = time.monotonic() + seconds
    while marker not in got:
        msg = c.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            notices.append(json.loads(msg))
        else:
            got += msg
    return got, notices


@pytest.fixture(scope="module")
def vm(agent, images):
    admin = Api(agent.url, agent.admin_token)
    r = admin.post("/v1/instances", json={"name": "console-vm", "kind": "vm", "image": "tiny-vm"})
    assert r.status_code == 202, r.text
    op = admin.wait(r.json())
    assert op["status"] == "succeeded", op
    yield op["result"]["instance"]
    admin.delete(f"/v1/instances/{op['result']['instance']['id']}")


def test_console_is_shared_typed_by_admins_and_watched_by_readers(agent, vm):
    path = f"/v1/instances/{vm['name']}/console"
    with _ws(agent, path, agent.admin_token) as a, _ws(agent, path, agent.reader_token) as r:
        a.send(b"hello-console\r")
        out_a, _ = _read_until(a, b"hello-console")
        out_r, _ = _read_until(r, b"hello-console")  # the second watcher sees the same output
        r.send(b"rm -rf /\r")  # a reader's typing is dropped, and it is told so
        _, notices = _read_until(r, b"\n", 5) if b"\n" not in out_r else (b"", [])
        deadline = time.monotonic() + 5
        while not any("read-only" in n.get("message", "") for n in notices):
            msg = r.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, str):
                notices.append(json.loads(msg))
        a.send(b"second\r")
        _read_until(a, b"second")
        with pytest.raises(TimeoutError):  # nothing of the reader's input reached the guest
            while True:
                msg = a.recv(0.5)
                assert b"rm -rf" not in (msg if isinstance(msg, bytes) else b"")


def test_console_refusals_are_plain_http(agent, admin, vm, images):
    for token, status in ((None, 401), ("na_000000000000_" + "x" * 43, 401)):
        with pytest.raises(InvalidStatus) as e:
            _ws(agent, f"/v1/instances/{vm['name']}/console", token)
        assert e.value.response.status_code == status
    with pytest.raises(InvalidStatus) as e:
        _ws(agent, "/v1/instances/nosuch/console", agent.admin_token)
    assert e.value.response.status_code == 404
    assert_error(admin.get(f"/v1/instances/{vm['name']}/console"), 400, "invalid")  # not an upgrade
    r = admin.post("/v1/instances", json={"name": "console-ct", "kind": "container", "image": "busybox"})
    ct = admin.wait(r.json())["result"]["instance"]
    try:
        with pytest.raises(InvalidStatus) as e:
            _ws(agent, f"/v1/instances/{ct['id']}/console", agent.admin_token)
        assert e.value.response.status_code == 409 and b"TTY" in e.value.response.body
    finally:
        admin.delete(f"/v1/instances/{ct['id']}")


def test_console_ends_when_the_vm_stops(agent, admin, vm):
    with _ws(agent, f"/v1/instances/{vm['name']}/console", agent.admin_token) as c:
        admin.wait(admin.post(f"/v1/instances/{vm['id']}/actions", json={"action": "stop", "force": True}).json())
        with pytest.raises(ConnectionClosed) as e:
            while True:
                c.recv(10)
        assert e.value.rcvd.code == 1000 and "stopped" in e.value.rcvd.reason
    admin.wait(admin.post(f"/v1/instances/{vm['id']}/actions", json={"action": "start"}).json())
    with _ws(agent, f"/v1/instances/{vm['name']}/console", agent.admin_token) as c:  # a new hub
        c.send(b"again\r")
        _read_until(c, b"again")


def test_cli_console_types_reads_and_detaches_with_ctrl_bracket(agent, vm):
    import sys

    from testbed.ptyrun import run_in_pty
    env = {**agent.env, "NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    code, out = run_in_pty([sys.executable, "-m", "agent", "console", vm["name"]],
                           [(b"detach with Ctrl-]", b"cli-typed\r"), (b"cli-typed", b"\x1d")], env=env,
                           cwd=str(agent.config.parent))
    assert code == 0 and b"detached from" in out, out


def test_a_browser_offers_its_token_as_a_subprotocol(agent, vm):
    url = agent.url.replace("http://", "ws://") + f"/v1/instances/{vm['name']}/console"
    with ws_connect(url, subprotocols=["nodeagent.v1", f"bearer.{agent.admin_token}"], open_timeout=10) as c:
        assert c.subprotocol == "nodeagent.v1"
        c.send(b"from-a-browser\r")
        _read_until(c, b"from-a-browser")
    with pytest.raises(InvalidStatus) as e:
        ws_connect(url, subprotocols=["nodeagent.v1", "bearer.na_000000000000_" + "x" * 43], open_timeout=10)
    assert e.value.response.status_code == 401


def test_vms_have_no_exec_or_files_and_containers_no_console(admin, vm):
    e = assert_error(admin.post(f"/v1/instances/{vm['name']}/exec", json={"command": ["sh"], "interactive": True}),
                     422)
    assert "guest agent" in e["message"] and "org.qemu.guest_agent.0" in e["message"]  # names the cause
    for r in (admin.get(f"/v1/instances/{vm['name']}/files", params={"path": "/etc/hostname"}),
              admin.put(f"/v1/instances/{vm['name']}/files", params={"path": "/x"}, data=b"x")):
        assert "no qemu-ga" in assert_error(r, 422)["message"]
    assert_error(admin.get(f"/v1/instances/{vm['name']}/exec/{'0' * 32}"), 404)


def test_exec_sessions_on_the_fake_runtime(agent, admin, images):
    r = admin.post("/v1/instances", json={"name": "exec-ct", "kind": "container", "image": "busybox"})
    ct = admin.wait(r.json())["result"]["instance"]
    try:
        sess = admin.post(f"/v1/instances/{ct['id']}/exec", json={"command": ["cat"], "interactive": True})
        assert sess.status_code == 201 and sess.json()["expires_in"] == 30
        with _ws(agent, sess.json()["websocket"], agent.admin_token) as c:
            c.send(b"typed\n")
            c.send(json.dumps({"type": "eof"}))
            got, code = b"", None
            for msg in c:
                if isinstance(msg, bytes):
                    got += msg[1:] if msg[0] == 1 else b""
                elif json.loads(msg)["type"] == "exit":
                    code = json.loads(msg)["exit_code"]
        assert (got, code) == (b"typed\n", 0)
        assert_error(admin.post(f"/v1/instances/{ct['id']}/exec", json={"command": ["sh"], "cwd": "/tmp"}), 422)
        r = admin.put(f"/v1/instances/{ct['id']}/files", params={"path": "/etc/motd"}, data=b"hi",
                      headers={"X-Nodeagent-Mode": "0600", "X-Nodeagent-Uid": "7"})
        assert r.status_code == 200 and r.json()["bytes"] == 2
        got = admin.get(f"/v1/instances/{ct['id']}/files", params={"path": "/etc/motd"})
        assert got.content == b"hi" and got.headers["X-Nodeagent-Mode"] == "0600"
        assert got.headers["X-Nodeagent-Uid"] == "7"
    finally:
        admin.delete(f"/v1/instances/{ct['id']}")


def test_no_request_is_refused_under_many_streams_and_consoles(agent, admin, vm):
    import contextlib
    import socket

    held = []
    with contextlib.ExitStack() as consoles:
        try:
            for i in range(150):  # from 3 addresses: under api.max_streams_per_client (128)
                s = socket.socket()
                s.bind((f"127.0.0.{2 + i % 3}", 0))
                s.connect(("127.0.0.1", agent.port))
                s.sendall(f"GET /v1/events HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {agent.admin_token}"
                          "\r\n\r\n".encode())
                held.append(s)
            for s in held:
                s.settimeout(30)
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            for _ in range(20):
                consoles.enter_context(_ws(agent, f"/v1/instances/{vm['name']}/console", agent.admin_token))
            for _ in range(20):
                assert admin.get("/v1/instances").status_code == 200
                assert admin.get("/v1/health").status_code == 200
        finally:
            for s in held:
                s.close()


def test_a_tty_containers_console_on_the_fake_runtime(agent, admin, images):
    e = assert_error(admin.post("/v1/instances", json={"name": "tty-vm", "kind": "vm", "image": "tiny-vm",
                                                       "tty": True}), 422)
    assert "tty" in e["message"]
    assert_error(admin.post("/v1/instances", json={"name": "tty-ct", "kind": "container", "image": "busybox",
                                                   "tty": "yes"}), 422)
    assert admin.get("/v1/instances/tty-ct").status_code == 404  # nothing left of the refused ones
    r = admin.post("/v1/instances", json={"name": "tty-ct", "kind": "container", "image": "busybox", "tty": True,
                                          "command": ["sh"]})
    ct = admin.wait(r.json())["result"]["instance"]
    try:
        assert ct["tty"] is True
        path = f"/v1/instances/{ct['id']}/console"
        with _ws(agent, path, agent.admin_token) as a, _ws(agent, path, agent.reader_token) as r:
            a.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            a.send(json.dumps({"type": "signal", "signal": 2}))  # not a console's control: refused
            a.send(b"fake-tty\r")
            _, notices = _read_until(a, b"fake-tty")
            _read_until(r, b"fake-tty")
            r.send(b"from-a-reader\r")
            deadline = time.monotonic() + 5
            while not any("read-only" in n.get("message", "") for n in notices):
                msg = r.recv(max(0.01, deadline - time.monotonic()))
                if isinstance(msg, str):
                    notices.append(json.loads(msg))
            a.send(b"after\r")
            got, more = _read_until(a, b"after")
            assert b"from-a-reader" not in got
            assert [n["message"] for n in notices + more if "refused" in n["message"]] == [
                "control message refused: '{\"type\": \"signal\", \"signal\": 2}'"]
            admin.wait(admin.post(f"/v1/instances/{ct['id']}/actions", json={"action": "stop"}).json())
            with pytest.raises(ConnectionClosed) as e:  # the terminal hangs up: every watcher's session ends
                while True:
                    a.recv(10)
            assert e.value.rcvd.code == 1000 and "container stopped" in e.value.rcvd.reason
        with pytest.raises(InvalidStatus) as e:
            _ws(agent, path, agent.admin_token)
        assert e.value.response.status_code == 409
        admin.wait(admin.post(f"/v1/instances/{ct['id']}/actions", json={"action": "start"}).json())
        with _ws(agent, path, agent.admin_token) as a:  # stop and start keep the TTY
            a.send(b"again\r")
            _read_until(a, b"again")
    finally:
        admin.delete(f"/v1/instances/{ct['id']}")
