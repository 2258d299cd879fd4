"""Operations data in the logs: request ids (header, operations, log lines), the access log,
failed operations, and where lines go (journald's native protocol, a rotated file)."""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time

import pytest

from agent import log as agent_log
from tests.api.conftest import assert_error


def _log_lines(agent, needle: str, timeout: float = 10) -> list[str]:
    """The agent's log lines holding ``needle`` (the access line is written right after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in agent.log.read_text(errors="replace").splitlines() if needle in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_every_answer_carries_a_request_id_and_a_valid_one_is_echoed(agent, admin, anon):
    r = admin.get("/v1/host")
    rid = r.headers["X-Request-Id"]
    assert r.status_code == 200 and len(rid) == 32 and int(rid, 16) >= 0
    assert admin.get("/v1/host").headers["X-Request-Id"] != rid  # one per request
    mine = "cp-7f3a:req/42"
    assert admin.get("/v1/host", headers={"X-Request-Id": mine}).headers["X-Request-Id"] == mine
    # errors too: from the app (401, 404, 405) and from the server itself (431)
    for r in (anon.get("/v1/host", headers={"X-Request-Id": mine}), admin.get("/v1/nothing-here"),
              admin.put("/v1/host")):
        assert r.status_code in (401, 404, 405) and r.headers.get("X-Request-Id"), r.headers
    assert anon.get("/v1/host", headers={"X-Request-Id": mine}).headers["X-Request-Id"] == mine
    r = anon.get("/v1/health", headers={"X-Big": "x" * 200_000})
    assert r.status_code == 431 and len(r.headers["X-Request-Id"]) == 32
    # a hostile id (too long, spaces, a forged log field) is replaced, never echoed
    for bad in ("a" * 129, "x y", 'id" level=error', "-starts-with-dash"):
        got = admin.get("/v1/host", headers={"X-Request-Id": bad}).headers["X-Request-Id"]
        assert got != bad and len(got) == 32


def test_each_request_writes_one_access_line(agent, admin, anon):
    rid = "access-test-1"
    r = admin.get("/v1/operations?status=failed&signature=s3cr3t", headers={"X-Request-Id": rid})
    assert r.status_code == 200
    (line,) = _log_lines(agent, f"request_id={rid}")
    assert "INFO agent.access: request" in line
    for field in ("method=GET", "status=200", "caller=admin", "role=admin", "auth=token", "client=127.0.0.1",
                  f"bytes={len(r.content)}", "duration_ms="):
        assert field in line, (field, line)
    assert 'path="/v1/operations?status=failed&signature=<redacted>"' in line and "s3cr3t" not in line
    assert_error(anon.get("/v1/host", headers={"X-Request-Id": "access-test-2"}), 401)
    (line,) = _log_lines(agent, "request_id=access-test-2")
    assert "status=401" in line and "caller=null" in line


def test_a_failed_operation_is_logged_with_its_request_id(agent, admin):
    """The operation keeps the request's id (GET /v1/operations/{id}); its failure is logged
    with its id, kind, target, error and that request id."""
    rid = "import-that-fails-1"
    r = admin.post("/v1/images", json={"name": "nowhere", "source": {"type": "url", "url": "http://127.0.0.1:9/x"}},
                   headers={"X-Request-Id": rid})
    assert r.status_code == 202 and r.headers["X-Request-Id"] == rid
    op = admin.wait(r.json())
    assert op["status"] == "failed" and op["request_id"] == rid
    assert admin.get(f"/v1/operations/{op['id']}").json()["request_id"] == rid
    lines = _log_lines(agent, f"operation={op['id']}")
    (line,) = [ln for ln in lines if "operation failed" in ln]
    assert "WARNING agent.operations: operation failed" in line
    for field in ("kind=image.import", "target=nowhere", f"request_id={rid}", "code="):
        assert field in line, (field, line)
    assert "error=" in line
    # and where its time went, as for every operation that ends
    (done,) = [ln for ln in lines if "operation finished" in ln]
    assert "status=failed" in done and "phases_ms=" in done and f"request_id={rid}" in done


# -- where lines go --

@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _journal_fields(data: bytes) -> dict:
    """Parse journald's native protocol (KEY=value lines; KEY\\n<le64 length><bytes>\\n)."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


@pytest.fixture
def journal(tmp_path):
    """A unix datagram socket standing in for journald's."""
    path = str(tmp_path / "journal.socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def test_under_systemd_lines_go_to_journald_with_fields(tmp_path, journal, restore_logging):
    path, sock = journal
    stderr = open(tmp_path / "stderr", "w")
    st = os.fstat(stderr.fileno())
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert agent_log.setup("info", "json", stream=stderr, target="auto", journal_socket=path, env=env) == "journal"
    with agent_log.bind(request_id="rid-1", operation="op-1"):
        logging.getLogger("agent.test").warning("pool is full", extra={"pool": "default", "details": "a\nb"})
    f = _journal_fields(sock.recv(65536))
    assert f["MESSAGE"] == "pool is full" and f["PRIORITY"] == "4" and f["SYSLOG_IDENTIFIER"] == "nodeagent"
    assert f["REQUEST_ID"] == "rid-1" and f["OPERATION"] == "op-1" and f["POOL"] == "default"
    assert f["DETAILS"] == "a\nb" and f["LOGGER"] == "agent.test" and f["CODE_FUNC"]
    # a record too large for a datagram travels in a sealed memfd, as sd_journal_send does it
    logging.getLogger("agent.test").info("big", extra={"blob": "z" * 400_000})
    msg, anc, _flags, _addr = sock.recvmsg(16, socket.CMSG_SPACE(4))
    assert msg == b"" and anc and anc[0][1] == socket.SCM_RIGHTS
    fd = struct.unpack("i", anc[0][2][:4])[0]
    with os.fdopen(fd, "rb") as memfd:
        memfd.seek(0)  # journald maps it; the sender left the offset at its end
        f = _journal_fields(memfd.read())
    assert f["MESSAGE"] == "big" and len(f["BLOB"]) == 400_000
    # another process's stderr (the variable inherited, the stream not the journal): no journal
    with open(tmp_path / "other", "w") as other:
        assert agent_log.setup("info", "json", stream=other, target="auto", journal_socket=path,
                               env=env) == "stderr"
    # the journal gone: the line falls back to stderr
    assert agent_log.setup("info", "text", stream=stderr, target="journal",
                           journal_socket=str(tmp_path / "gone.socket")) == "journal"
    logging.getLogger("agent.test").error("still said", extra={"pool": "p"})
    stderr.flush()
    assert "ERROR agent.test: still said pool=p" in (tmp_path / "stderr").read_text()


def test_daemon_mode_log_file_rotates_and_is_private(tmp_path, restore_logging):
    path = tmp_path / "log" / "agent.log"
    assert agent_log.setup("info", "json", target="auto", file=str(path), max_bytes=2000, backups=2,
                           env={}) == "file"
    for i in range(100):
        logging.getLogger("agent.test").info("line", extra={"i": i})
    assert (tmp_path / "log" / "agent.log.1").exists() and (tmp_path / "log" / "agent.log.2").exists()
    assert not (tmp_path / "log" / "agent.log.3").exists()
    for p in (path, tmp_path / "log" / "agent.log.1"):
        assert p.stat().st_mode & 0o777 == 0o600
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["i"] == 99


def test_with_max_bytes_0_an_external_logrotate_moves_the_file(tmp_path, restore_logging):
    path = tmp_path / "agent.log"
    agent_log.setup("info", "text", target="file", file=str(path), max_bytes=0, env={})
    logging.getLogger("agent.test").info("before")
    os.rename(path, tmp_path / "agent.log.1")  # what logrotate does
    logging.getLogger("agent.test").info("after")
    assert "before" in (tmp_path / "agent.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()
