"""Interactive exec on a real runc container through a real agent and a real websocket client:
a TTY running sh (resize seen by stty, ^C, `exit 3`), separate stdout/stderr with stdin EOF,
env/cwd/user, a client that leaves (its process is killed), and what a reader or another
caller cannot do."""
from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from testbed.agentproc import AgentProcess, Api
from tests.api.conftest import assert_error
from tests.api.test_interactive import _read_until

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    import tempfile
    from pathlib import Path
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from tests.api.test_crash import _import_busybox
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-iexec-", dir="/tmp"))
    tmp.chmod(0o711)  # user-namespaced containers' roots reach their rootfs by path (as open_tmp)
    agent = AgentProcess(tmp / "a", pool_kind="local", runtime="runc")
    agent.admin_token = agent.token("admin", "admin")
    agent.reader_token = agent.token("reader", "reader")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    name = f"ix-{secrets.token_hex(3)}"  # runc cgroups are host-wide: unique per run
    try:
        _import_busybox(api, tmp)
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "network": "none", "memory_mib": 64,
                                                      "command": ["/bin/sh", "-c", "sleep 3600"]}).json())
        assert op["status"] == "succeeded", op
        agent.name, agent.tmp = name, tmp
        yield agent
    finally:
        api.delete(f"/v1/instances/{name}")
        agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _session(agent, body, token=None):
    r = Api(agent.url, token or agent.admin_token).post(f"/v1/instances/{agent.name}/exec",
                                                        json={"interactive": True, **body})
    assert r.status_code == 201, r.text
    url = agent.url.replace("http://", "ws://") + r.json()["websocket"]
    return ws_connect(url, additional_headers={"Authorization": f"Bearer {token or agent.admin_token}"},
                      open_timeout=10)


def _collect(c, until: bytes | None = None, seconds: float = 20) -> tuple[dict, int | None]:
    """Output per channel until ``until`` shows on channel 1 (or the exit); (outputs, exit code)."""
    out, code = {1: b"", 2: b""}, None
    deadline = time.monotonic() + seconds
    while True:
        msg = c.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            ctl = json.loads(msg)
            if ctl["type"] == "exit":
                return out, ctl["exit_code"]
            continue
        out[msg[0]] += msg[1:]
        if until is not None and until in out[1]:
            return out, code


def test_metrics_report_what_the_stats_route_reports(real):
    """/metrics reads the containers' counters together (RuncRuntime.bulk_stats): the same
    figures as GET /v1/instances/{id}/stats reads one at a time."""
    from tests.api.test_metrics import assert_metrics_match_stats
    api = Api(real.url, real.reader_token)
    assert_metrics_match_stats(lambda: api.get(f"/v1/instances/{real.name}/stats").json(),
                               lambda: api.get("/metrics").text, real.name, "container")


def test_tty_sh_resize_ctrl_c_and_exit_code(real):
    with _session(real, {"command": ["/bin/sh"], "tty": True, "cols": 100, "rows": 30}) as c:
        c.send(b"stty size; echo MARK-$((6*7))\r")
        out, _ = _collect(c, b"MARK-42")
        assert b"30 100" in out[1]
        c.send(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
        c.send(b"stty size; echo MARK-$((7*7))\r")
        out, _ = _collect(c, b"MARK-49")
        assert b"43 132" in out[1]
        c.send(b"sleep 100\r")
        time.sleep(0.5)
        c.send(b"\x03")  # ^C through the terminal: the sleep ends, the shell stays
        c.send(b"echo MARK-$((8*8))\r")
        _collect(c, b"MARK-64")
        c.send(b"exit 3\r")
        _, code = _collect(c)
        assert code == 3


def test_streams_env_cwd_user_and_stdin_eof(real):
    body = {"command": ["/bin/sh", "-c", "echo out-$FOO-$(pwd)-$(id -u); echo err >&2; cat; exit 5"],
            "env": {"FOO": "bar"}, "cwd": "/bin", "user": "1000:1000"}
    with _session(real, body) as c:
        c.send(b"from-stdin\n")
        c.send(json.dumps({"type": "eof"}))
        out, code = _collect(c)
    assert (out, code) == ({1: b"out-bar-/bin-1000\nfrom-stdin\n", 2: b"err\n"}, 5)


def test_a_client_that_leaves_kills_its_process(real):
    cmd = f"sleep {secrets.randbelow(10**6) + 10**6}"  # a command line no other test runs

    def running() -> bool:
        return subprocess.run(["pgrep", "-f", f"^{cmd}$"], capture_output=True).returncode == 0

    with _session(real, {"command": ["/bin/sh", "-c", f"exec {cmd}"], "tty": True}):
        deadline = time.monotonic() + 10
        while not running():
            assert time.monotonic() < deadline, "the exec'd process never ran"
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while running():
        assert time.monotonic() < deadline, "the exec'd process outlived its session"
        time.sleep(0.2)


def test_readers_other_callers_and_bad_requests(real):
    admin, reader = Api(real.url, real.admin_token), Api(real.url, real.reader_token)
    assert_error(reader.post(f"/v1/instances/{real.name}/exec", json={"command": ["sh"], "interactive": True}),
                 403)
    r = admin.post(f"/v1/instances/{real.name}/exec", json={"command": ["sh"], "interactive": True})
    url = real.url.replace("http://", "ws://") + r.json()["websocket"]
    with pytest.raises(InvalidStatus) as e:  # a reader cannot take an admin's session
        ws_connect(url, additional_headers={"Authorization": f"Bearer {real.reader_token}"}, open_timeout=10)
    assert e.value.response.status_code == 403
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {real.admin_token}"}, open_timeout=10) as c:
        c.send(json.dumps({"type": "eof"}))
        assert _collect(c)[1] == 0
    with pytest.raises(InvalidStatus) as e:  # used once
        ws_connect(url, additional_headers={"Authorization": f"Bearer {real.admin_token}"}, open_timeout=10)
    assert e.value.response.status_code == 404
    assert_error(admin.post(f"/v1/instances/{real.name}/exec", json={"command": ["sh"], "tty": True}), 422)
    assert_error(admin.post(f"/v1/instances/{real.name}/exec",
                            json={"command": ["sh"], "interactive": True, "user": "root"}), 422)
    with _session(real, {"command": ["/nonexistent"], "tty": True}) as c:
        _, code = _collect(c)
    assert code != 0


def test_cli_exec_it_sh_gives_the_remote_exit_code(real):
    import sys

    from testbed.ptyrun import run_in_pty
    env = {**real.env, "NODEAGENT_URL": real.url, "NODEAGENT_TOKEN": real.admin_token}
    code, out = run_in_pty([sys.executable, "-m", "agent", "exec", "-it", real.name, "--", "/bin/sh"],
                           [(b"", b"echo CLI-$((6*7))\r"), (b"CLI-42", b"exit 3\r")], env=env,
                           cwd=str(real.tmp))
    assert code == 3, out
    r = subprocess.run([sys.executable, "-m", "agent", "exec", "-i", real.name, "--", "/bin/sh", "-c",
                        "tr a-z A-Z; exit 4"], input=b"piped\n", capture_output=True, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (4, b"PIPED\n"), r


def _exec(real, *argv) -> dict:
    r = Api(real.url, real.admin_token).post(f"/v1/instances/{real.name}/exec", json={"command": list(argv)})
    assert r.status_code == 200, r.text
    return r.json()


def test_push_and_pull_a_large_file_by_the_cli_byte_identical(real):
    import hashlib
    import os
    import sys
    src, back = real.tmp / "big.bin", real.tmp / "big.back"
    h = hashlib.sha256()
    with open(src, "wb") as f:  # 200 MiB, written in pieces
        for i in range(200):
            block = hashlib.sha256(str(i).encode()).digest() * 32768  # 1 MiB
            h.update(block)
            f.write(block)
    env = {**real.env, "NODEAGENT_URL": real.url, "NODEAGENT_TOKEN": real.admin_token}
    cli = [sys.executable, "-m", "agent", "file"]
    r = subprocess.run([*cli, "push", str(src), f"{real.name}:/big.bin", "--uid", "1000", "--gid", "100",
                        "--mode", "0640"], capture_output=True, text=True, env=env, cwd=real.tmp, timeout=300)
    assert r.returncode == 0 and "209715200 bytes" in r.stderr, r
    os.unlink(src)
    r = subprocess.run([*cli, "list", f"{real.name}:/", "--json"], capture_output=True, text=True, env=env,
                       cwd=real.tmp, timeout=60)
    big = next(e for e in json.loads(r.stdout)["entries"] if e["name"] == "big.bin")
    assert (big["size"], big["mode"], big["uid"], big["gid"]) == (209715200, "0640", 1000, 100)
    r = subprocess.run([*cli, "mkdir", f"{real.name}:/made-by-cli", "--mode", "0711"], capture_output=True,
                       text=True, env=env, cwd=real.tmp, timeout=60)
    assert r.returncode == 0, r
    r = subprocess.run([*cli, "pull", f"{real.name}:/made-by-cli", "-"], capture_output=True, text=True, env=env,
                       cwd=real.tmp, timeout=60)
    assert r.returncode != 0 and "is a directory" in r.stderr
    seen = _exec(real, "/bin/sh", "-c", "stat -c '%u %g %a %s' /big.bin")
    assert seen["stdout"].split() == ["1000", "100", "640", "209715200"], seen  # the container's own ids
    r = subprocess.run([*cli, "pull", f"{real.name}:/big.bin", str(back)], capture_output=True, text=True,
                       env=env, cwd=real.tmp, timeout=300)
    assert r.returncode == 0 and "mode 0640, owner 1000:100" in r.stderr, r
    h2 = hashlib.sha256()
    with open(back, "rb") as f:
        while data := f.read(1 << 20):
            h2.update(data)
    assert h2.hexdigest() == h.hexdigest()
    os.unlink(back)
    _exec(real, "/bin/rm", "/big.bin")


def test_files_never_leave_the_rootfs(real):
    import secrets as s
    admin, reader = Api(real.url, real.admin_token), Api(real.url, real.reader_token)
    mark = s.token_hex(8)
    host_file = real.tmp / f"host-{mark}"
    host_file.write_text("host secret")
    _exec(real, "/bin/sh", "-c", f"ln -s {host_file} /abs-link; ln -s ../../../../../../../{real.tmp} /rel-dir; "
          "ln -s /proc/1/root /magic; mkdir -p /d; echo inside > /d/f")
    # an absolute and a climbing symlink resolve inside the container: nothing of the host is read
    assert_error(admin.get(f"/v1/instances/{real.name}/files", params={"path": "/abs-link"}), 404)
    assert_error(admin.get(f"/v1/instances/{real.name}/files",
                           params={"path": f"/rel-dir/host-{mark}"}), 404)
    assert_error(admin.get(f"/v1/instances/{real.name}/files", params={"path": "/magic/etc/passwd"}), 404)
    # a push through them lands inside, never on the host
    r = admin.put(f"/v1/instances/{real.name}/files", params={"path": f"/rel-dir/host-{mark}"}, data=b"x")
    assert r.status_code in (404, 422) and host_file.read_text() == "host secret"
    r = admin.put(f"/v1/instances/{real.name}/files", params={"path": "/abs-link"}, data=b"replaced")
    assert r.status_code == 200 and host_file.read_text() == "host secret"  # the link is replaced, not followed
    seen = _exec(real, "/bin/sh", "-c", "ls -l /abs-link; cat /abs-link")
    assert seen["stdout"].endswith("replaced"), seen
    got = admin.get(f"/v1/instances/{real.name}/files", params={"path": "/d/../d/f"})
    assert got.content == b"inside\n" and got.headers["X-Nodeagent-Mode"] == "0644"
    listing = admin.get(f"/v1/instances/{real.name}/files", params={"path": "/d"})
    assert listing.headers["X-Nodeagent-Type"] == "directory"
    assert [(e["name"], e["type"], e["size"]) for e in listing.json()["entries"]] == [("f", "file", 7)]
    root = {e["name"]: e for e in admin.get(f"/v1/instances/{real.name}/files", params={"path": "/"}).json()["entries"]}
    assert root["abs-link"]["type"] == "file" and root["magic"]["type"] == "symlink"  # listed, never followed
    r = admin.put(f"/v1/instances/{real.name}/files", params={"path": "/rel-dir/made"},
                  headers={"X-Nodeagent-Type": "directory", "X-Nodeagent-Uid": "1000", "X-Nodeagent-Mode": "0700"})
    assert r.status_code in (404, 422), r.text  # through a climbing symlink: not on the host
    assert not (real.tmp / "made").exists()
    r = admin.put(f"/v1/instances/{real.name}/files", params={"path": "/d/sub"},
                  headers={"X-Nodeagent-Type": "directory", "X-Nodeagent-Uid": "1000", "X-Nodeagent-Mode": "0700"})
    assert r.status_code == 200, r.text
    assert _exec(real, "/bin/sh", "-c", "stat -c '%u %a %F' /d/sub")["stdout"].strip() == "1000 700 directory"
    assert_error(admin.put(f"/v1/instances/{real.name}/files", params={"path": "/d/sub"},
                           headers={"X-Nodeagent-Type": "directory"}), 409)
    assert_error(admin.get(f"/v1/instances/{real.name}/files", params={"path": "relative"}), 400)
    assert_error(admin.put(f"/v1/instances/{real.name}/files", params={"path": "/nodir/f"}, data=b"x"), 404)
    assert_error(admin.put(f"/v1/instances/{real.name}/files", params={"path": "/f"}, data=b"x",
                           headers={"X-Nodeagent-Mode": "99999"}), 400)
    assert_error(admin.put(f"/v1/instances/{real.name}/files", params={"path": "/f"}, data=b"x",
                           headers={"X-Nodeagent-Uid": "4294967295"}), 400)
    assert_error(reader.get(f"/v1/instances/{real.name}/files", params={"path": "/d/f"}), 403)
    assert_error(reader.put(f"/v1/instances/{real.name}/files", params={"path": "/d/g"}, data=b"x"), 403)
    left = _exec(real, "/bin/sh", "-c", "ls -a / /d | grep nodeagent-push || true")["stdout"]
    assert left == ""  # failed pushes leave no temporary file


def test_a_background_process_holding_the_terminal_does_not_keep_the_session(real):
    with _session(real, {"command": ["/bin/sh", "-c", "(while :; do echo bg; sleep 0.1; done) & exit 4"],
                         "tty": True}) as c:
        _, code = _collect(c, seconds=30)
    assert code == 4
    _exec(real, "/bin/sh", "-c", "pkill -f 'sleep 0.1' ; kill $(pgrep -f 'while :') 2>/dev/null; true")


def _console(real, name, token):
    url = real.url.replace("http://", "ws://") + f"/v1/instances/{name}/console"
    return ws_connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10)


def _screen(c, until: bytes) -> tuple[bytes, list]:
    return _read_until(c, until, seconds=20)


def test_a_tty_containers_console_typed_resized_watched_detached_and_readopted(real):
    """The last test of this module: it kills and restarts the module's agent."""
    import sys

    from testbed.ptyrun import run_in_pty
    admin = Api(real.url, real.admin_token)
    name = f"tty-{secrets.token_hex(3)}"
    op = admin.wait(admin.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "network": "none", "memory_mib": 64, "tty": True,
                                                      "command": ["/bin/sh"]}).json())
    assert op["status"] == "succeeded", op
    try:
        assert admin.get(f"/v1/instances/{name}").json()["tty"] is True
        with _console(real, name, real.admin_token) as a, _console(real, name, real.reader_token) as r:
            a.send(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
            a.send(b"stty size; echo hi-$((6*7))\r")
            out, _ = _screen(a, b"hi-42")
            assert b"30 100" in out
            _screen(r, b"hi-42")  # every watcher sees the output
            r.send(b"echo typed-by-a-reader-$((1+1))\r")  # a reader's input is refused, and it is told
            deadline = time.monotonic() + 10
            while True:
                msg = r.recv(max(0.01, deadline - time.monotonic()))
                if isinstance(msg, str) and "read-only" in json.loads(msg)["message"]:
                    break
            a.send(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
            a.send(b"stty size; echo hi-$((7*7))\r")
            out, _ = _screen(a, b"hi-49")
            assert b"43 132" in out and b"typed-by-a-reader-2" not in out
            a.send(json.dumps({"type": "resize", "cols": 0, "rows": 5}))
            a.send(b"echo hi-$((8*8))\r")
            _, notices = _screen(a, b"hi-64")
            assert any("refused" in n["message"] for n in notices)
        # both detached: the container runs on, its log kept the terminal's output
        assert admin.get(f"/v1/instances/{name}").json()["state"] == "running"
        assert "hi-42" in admin.get(f"/v1/instances/{name}/logs").text
        # the agent killed while attached: conmon and the shell run on (output meanwhile is logged); the
        # restarted agent attaches to the terminal conmon kept
        with contextlib.suppress(ConnectionClosed, OSError), _console(real, name, real.admin_token) as held:
            held.send(b"(sleep 1; echo while-away-$((6*7))) &\r")
            _screen(held, b"while-away-$((6*7))")  # the terminal's echo: the shell has the line
            real.kill9()
        real.start()
        deadline = time.monotonic() + 20
        while "while-away-42" not in admin.get(f"/v1/instances/{name}/logs").text:
            assert time.monotonic() < deadline, "the terminal's output stopped with the agent"
            time.sleep(0.2)
        with _console(real, name, real.admin_token) as a:
            a.send(b"echo again-$((6*7))\r")
            _screen(a, b"again-42")
        # the CLI on a terminal of its own: types, reads, detaches with Ctrl-]
        env = {**real.env, "NODEAGENT_URL": real.url, "NODEAGENT_TOKEN": real.admin_token}
        code, out = run_in_pty([sys.executable, "-m", "agent", "console", name],
                               [(b"detach with Ctrl-]", b"echo cli-$((6*7))\r"), (b"cli-42", b"\x1d")],
                               env=env, cwd=str(real.tmp))
        assert code == 0 and b"detached from" in out, out
        # stop and start keep the terminal
        op = admin.wait(admin.post(f"/v1/instances/{name}/actions", json={"action": "stop", "force": True}).json())
        assert op["status"] == "succeeded", op
        with pytest.raises(InvalidStatus) as e:
            _console(real, name, real.admin_token)
        assert e.value.response.status_code == 409
        op = admin.wait(admin.post(f"/v1/instances/{name}/actions", json={"action": "start"}).json())
        assert op["status"] == "succeeded", op
        with _console(real, name, real.admin_token) as a:
            a.send(b"echo restarted-$((6*7))\r")
            _screen(a, b"restarted-42")
    finally:
        admin.delete(f"/v1/instances/{name}")
