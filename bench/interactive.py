"""Interactive access benchmarks: JSON lines as described in DESIGN.md section 7.

(a) exec round trip of `true` in a real runc container: an interactive exec through the API
    (POST .../exec, the websocket, the exit message) vs `runc exec NAME busybox true` on the host;
    and the buffered exec (one POST) against the same peer.
(b) push of a 200 MiB file into the container: `nodeagent file push` (PUT .../files, streamed)
    vs `tar c FILE | runc exec NAME tar x -C /` on the host.
(c) console echo on a real VM (the test guest, TCG; its user-data answers each line on its
    serial port): a line typed through GET .../console until its answer is back, vs the same
    through `virsh console` on a pty (one at a time: both read the same serial line).
(c') console echo on a TTY container (real runc + conmon, /bin/sh on its terminal): a line
    typed through GET .../console until the shell's answer is back, vs the same through conmon's
    attach socket directly (what `podman attach` speaks: SOCK_SEQPACKET, a stream byte before
    each output message), one client at a time.
(d) GET /v1/instances p99 (a fake-driver agent with 50 running fake VMs) with nothing open vs
    with 300 event streams and 50 console websockets open (one per VM), from a separate load
    process (4 keep-alive connections).

Run: NODEAGENT_TEST_IMAGES=/var/cache/nodeagent-test-images-ud .venv/bin/python bench/interactive.py
(BENCH_ONLY=exec|push|ctconsole|console|list runs one part.)
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsonline import emitter
from testbed.agentproc import AgentProcess, Api

EXECS = 30
PUSH_MIB = 200
ECHOES = 20
STREAMS, CONSOLES = 300, 50
LOAD_SECONDS = 6

line = emitter("interactive")


def _ws(agent, token, path):
    from websockets.sync.client import connect
    return connect(agent.url.replace("http://", "ws://") + path,
                   additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=30, max_size=None)


def _exec_ws(agent, token, name, argv) -> int:
    api = Api(agent.url, token)
    r = api.post(f"/v1/instances/{name}/exec", json={"command": argv, "interactive": True})
    assert r.status_code == 201, r.text
    sess = r.json()
    with _ws(agent, token, sess["websocket"]) as c:
        c.send(json.dumps({"type": "eof"}))
        for msg in c:
            if isinstance(msg, str) and json.loads(msg).get("type") == "exit":
                return json.loads(msg)["exit_code"]
    raise RuntimeError("no exit code")


def bench_runc(tmp: Path, parts: set[str]) -> None:
    from api import import_busybox  # bench/api.py
    agent = AgentProcess(tmp / "runc", pool_kind="local", runtime="runc")
    token = agent.token("bench", "admin")
    agent.start()
    name = f"bi-{secrets.token_hex(3)}"
    try:
        api = Api(agent.url, token)
        import_busybox(api, tmp)
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "network": "none", "memory_mib": 256,
                                                      "command": ["/bin/sh", "-c", "sleep 3600"]}).json())
        assert op["status"] == "succeeded", op
        root = next(p.parent.parent for p in agent.state_dir.rglob(f"runc/{name}/state.json"))
        runc = ["runc", "--root", str(root)]
        if "exec" in parts:
            ws_ms, post_ms, peer_ms = [], [], []
            for i in range(EXECS + 1):  # the first of each is a warm-up
                t0 = time.perf_counter()
                code = _exec_ws(agent, token, name, ["/bin/busybox", "true"])
                assert code == 0, code
                t1 = time.perf_counter()
                r = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/busybox", "true"]})
                t2 = time.perf_counter()
                subprocess.run([*runc, "exec", name, "/bin/busybox", "true"], check=True)
                t3 = time.perf_counter()
                assert r.json()["exit_code"] == 0
                if i:
                    ws_ms.append((t1 - t0) * 1000)
                    post_ms.append((t2 - t1) * 1000)
                    peer_ms.append((t3 - t2) * 1000)
            peer = statistics.median(peer_ms)
            line("exec_interactive_true_p50", statistics.median(ws_ms), "runc exec NAME busybox true", peer)
            line("exec_buffered_true_p50", statistics.median(post_ms), "runc exec NAME busybox true", peer)
        if "push" in parts:
            src = tmp / "push.bin"
            with open(src, "wb") as f:
                for _ in range(PUSH_MIB):
                    f.write(os.urandom(1 << 20))
            env = {**agent.env, "NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": token}
            ours, peer, raw = [], [], []
            for i in range(3):
                t = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", "/dev/null", "-T", str(src), "-H",
                                f"Authorization: Bearer {token}",
                                f"{agent.url}/v1/instances/{name}/files?path=/curl-{i}.bin"], check=True)
                raw.append(time.perf_counter() - t)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "agent", "file", "push", str(src), f"{name}:/push-{i}.bin"],
                               check=True, env=env, capture_output=True)
                t1 = time.perf_counter()
                tar = subprocess.Popen(["tar", "c", "-C", str(tmp), "push.bin"], stdout=subprocess.PIPE)
                subprocess.run([*runc, "exec", name, "/bin/busybox", "tar", "x", "-C", "/"], stdin=tar.stdout,
                               check=True)
                tar.wait()
                t2 = time.perf_counter()
                ours.append(t1 - t0)
                peer.append(t2 - t1)
                api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/busybox", "rm", f"/push-{i}.bin",
                                                                         "/push.bin", f"/curl-{i}.bin"]})
            line(f"push_{PUSH_MIB}mib", statistics.median(ours), "tar c | runc exec NAME tar x",
                 statistics.median(peer), unit="s")  # the CLI: its start (~0.4 s of imports) included
            line(f"push_{PUSH_MIB}mib_api_curl", statistics.median(raw), "tar c | runc exec NAME tar x",
                 statistics.median(peer), unit="s")
        if "ctconsole" in parts:
            bench_container_console(agent, token, tmp)
    finally:
        Api(agent.url, token).delete(f"/v1/instances/{name}")
        agent.stop()


def bench_container_console(agent, token, tmp: Path) -> None:
    api = Api(agent.url, token)
    name = f"bt-{secrets.token_hex(3)}"
    op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                  "network": "none", "memory_mib": 64, "tty": True,
                                                  "command": ["/bin/sh"]}).json())
    assert op["status"] == "succeeded", op
    try:
        ours = []
        with _ws(agent, token, f"/v1/instances/{name}/console") as c:
            def ws_echo(i):
                c.send(f"echo ab$(({i}))z\r".encode())  # the terminal's echo shows the $((..)), the answer ab<i>z
                seen = b""
                while f"ab{i}z".encode() not in seen:
                    msg = c.recv(30)
                    seen += msg if isinstance(msg, bytes) else b""
            ws_echo(10**6)
            for i in range(ECHOES):
                t0 = time.perf_counter()
                ws_echo(i)
                ours.append((time.perf_counter() - t0) * 1000)
        bundle = next(p.parent for p in agent.state_dir.rglob(f"containers/{name}/bundle/config.json"))
        peer = _conmon_echoes(bundle)
        line("container_console_echo_p50", statistics.median(ours), "conmon attach socket (direct)",
             statistics.median(peer))
    finally:
        api.delete(f"/v1/instances/{name}")


def _conmon_echoes(bundle: Path) -> list[float]:
    dfd = os.open(bundle, os.O_PATH)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(f"/proc/self/fd/{dfd}/attach")  # the bundle's path may be too long for an address
    s.settimeout(30)
    out = []
    try:
        def echo(i):
            s.send(f"echo ab$(({i}))z\r".encode())
            seen = b""
            while f"ab{i}z".encode() not in seen:
                seen += s.recv(8193)[1:]  # the first byte names the stream
        echo(10**6 + 1)
        for i in range(ECHOES):
            t0 = time.perf_counter()
            echo(i)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        s.close()
        os.close(dfd)
    return out


USER_DATA = ("#!/bin/sh\nwhile read -r l < /dev/ttyS0; do echo \"NODEAGENT-ECHO $l\" > /dev/ttyS0; done\n")


def bench_console(tmp: Path) -> None:
    from testbed import libvirt_daemon
    images = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
    uri = libvirt_daemon.ensure().uri
    vmdir = Path(tempfile.mkdtemp(prefix="bench-console-", dir="/var/tmp"))
    os.chmod(vmdir, 0o755)
    agent = AgentProcess(vmdir / "a", pool_kind="local", import_dirs=[images, str(vmdir)])
    agent.config.write_text(agent.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{uri}"\nvirt_type = "qemu"\n'))
    token = agent.token("bench", "admin")
    agent.start()
    name = f"bc-{secrets.token_hex(3)}"
    try:
        api = Api(agent.url, token)
        op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{images}/boot.qcow2"}}).json(), timeout=300)
        assert op["status"] == "succeeded", op
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "boot", "cpus": 1,
                                                      "memory_mib": 192, "network": "none",
                                                      "user_data": USER_DATA}).json(), timeout=300)
        assert op["status"] == "succeeded", op
        ours = []
        with _ws(agent, token, f"/v1/instances/{name}/console") as c:
            _echo_ws(c, "warmup", 300)
            for i in range(ECHOES):
                t0 = time.perf_counter()
                _echo_ws(c, f"e{i}", 30)
                ours.append((time.perf_counter() - t0) * 1000)
        peer = _virsh_echoes(uri, name)
        line("console_echo_p50", statistics.median(ours), "virsh console (pty)", statistics.median(peer))
    finally:
        Api(agent.url, token).delete(f"/v1/instances/{name}")
        agent.stop()
        shutil.rmtree(vmdir, ignore_errors=True)


def _echo_ws(c, word: str, timeout: float) -> None:
    want, seen = f"NODEAGENT-ECHO {word}".encode(), b""
    deadline = time.monotonic() + timeout
    typed = 0.0
    while want not in seen:
        if time.monotonic() - typed > 2:
            c.send(f"{word}\r".encode())
            typed = time.monotonic()
        try:
            msg = c.recv(max(0.01, min(0.5, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            continue
        if isinstance(msg, bytes):
            seen += msg


def _virsh_echoes(uri: str, name: str) -> list[float]:
    import select
    master, slave = os.openpty()
    proc = subprocess.Popen(["virsh", "-c", uri, "console", name, "--force"], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    out = []
    try:
        def echo(word):
            want, seen = f"NODEAGENT-ECHO {word}".encode(), b""
            os.write(master, f"{word}\r".encode())
            while want not in seen:
                if not select.select([master], [], [], 30)[0]:
                    raise TimeoutError(f"virsh console: no answer to {word}")
                seen += os.read(master, 65536)
        time.sleep(1)  # virsh connects
        echo("vwarm")
        for i in range(ECHOES):
            t0 = time.perf_counter()
            echo(f"v{i}")
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    return out


LOAD = r'''
import http.client, json, sys, threading, time
port, token, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
lat = []
def run():
    c = http.client.HTTPConnection("127.0.0.1", port)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        c.request("GET", "/v1/instances", headers={"Authorization": "Bearer " + token})
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        lat.append(time.perf_counter() - t0)
ts = [threading.Thread(target=run) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
lat.sort(); print(json.dumps({"p99": lat[int(len(lat) * 0.99)] * 1000, "n": len(lat)}))
'''


def bench_list(tmp: Path) -> None:
    agent = AgentProcess(tmp / "list", pool_kind="local")
    token = agent.token("bench", "admin")
    agent.start()
    held = []
    consoles = contextlib.ExitStack()
    try:
        api = Api(agent.url, token)
        img = tmp / "tiny.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
        assert api.wait(api.post("/v1/images", json={"name": "tiny", "source": {"type": "file",
                                                                                "path": str(img)}}).json())
        ops = [api.post("/v1/instances", json={"name": f"v{i}", "kind": "vm", "image": "tiny"}).json()
               for i in range(CONSOLES)]
        for op in ops:
            assert api.wait(op, timeout=300)["status"] == "succeeded"

        def p99() -> float:
            out = subprocess.run([sys.executable, "-c", LOAD, str(agent.port), token, str(LOAD_SECONDS)],
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout)["p99"]

        idle = p99()
        for i in range(STREAMS):  # from 4 addresses: under api.max_streams_per_client (128)
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 4}", 0))
            s.connect(("127.0.0.1", agent.port))
            s.sendall(f"GET /v1/events HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            held.append(s)
        for s in held:
            s.settimeout(30)
            assert s.recv(4096).startswith(b"HTTP/1.1 200"), "an event stream was refused"
        for i in range(CONSOLES):
            consoles.enter_context(_ws(agent, token, f"/v1/instances/v{i}/console"))
        busy = p99()
    finally:
        for h in held:
            h.close()
        consoles.close()
        agent.stop()
    line("list_p99_under_streams", busy, f"no streams open (vs {STREAMS} streams + {CONSOLES} consoles)", idle)


def main():
    parts = {os.environ["BENCH_ONLY"]} if os.environ.get("BENCH_ONLY") else {"exec", "push", "ctconsole", "console",
                                                                             "list"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-interactive-"))
    os.chmod(tmp, 0o711)  # user-namespaced containers' roots traverse it to their rootfs
    try:
        if parts & {"exec", "push", "ctconsole"}:
            bench_runc(tmp, parts)
        if "console" in parts:
            bench_console(tmp)
        if "list" in parts:
            bench_list(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
