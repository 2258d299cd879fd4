"""agent/httpserver.py in-process, in front of a small Flask app: streamed request bodies
(chunked, 100-continue, stalls), pipelining, HEAD, and a client that never reads a stream."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time

import pytest
import requests
from flask import Flask, Response, request

from agent.config import ApiConfig
from agent.httpserver import HttpServer
from agent.server import listen
from tests.api.serving import chunk, closed_within, connect, request as raw, responses


def _app(stream_closed: threading.Event) -> Flask:
    app = Flask("served")
    app.config["MAX_CONTENT_LENGTH"] = 4096

    @app.put("/upload")  # long: its body streams in
    def upload():
        request.max_content_length = 1 << 40  # as the peer routes do
        h, n = hashlib.sha256(), 0
        while data := request.stream.read(1 << 20):
            h.update(data)
            n += len(data)
        return {"bytes": n, "sha256": h.hexdigest()}

    @app.post("/echo")  # short: its body comes whole
    def echo():
        return {"bytes": len(request.get_data())}

    @app.get("/hello")
    def hello():
        return {"hello": "world"}

    @app.get("/poll")  # long, no body: a long poll
    def poll():
        time.sleep(0.2)
        return {"done": True}

    @app.get("/firehose")  # long: 1 MiB chunks for as long as someone reads
    def firehose():
        def gen():
            try:
                while True:
                    yield b"z" * (1 << 20)
            finally:
                stream_closed.set()
        return Response(gen(), mimetype="application/octet-stream")

    return app


@pytest.fixture
def served():
    """Start a server on a loop of its own; yields (port, firehose_closed)."""
    closed = threading.Event()
    app = _app(closed)
    server = HttpServer(app, ApiConfig(body_timeout=1, write_timeout=1, max_body_bytes=4096),
                        frozenset({"upload", "firehose", "poll"}))
    with running(server) as port:
        yield port, closed


@contextlib.contextmanager
def running(server: HttpServer):
    """``server`` on 127.0.0.1 on a loop and thread of its own; yields its port, then stops it."""
    sock = listen("127.0.0.1:0")
    loop = asyncio.new_event_loop()
    ready, box = threading.Event(), {}

    async def main():
        box["stop"] = asyncio.Event()
        ready.set()
        await server.serve(sock, box["stop"])

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    ready.wait(5)
    yield sock.getsockname()[1]
    loop.call_soon_threadsafe(box["stop"].set)
    t.join(15)
    assert not t.is_alive()


def test_a_chunked_body_streams_to_a_long_route(served):
    port, _ = served
    parts = [bytes([i]) * 300_000 for i in range(20)]  # 6 MB, far over max_body_bytes
    r = requests.put(f"http://127.0.0.1:{port}/upload", data=iter(parts), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"bytes": 6_000_000, "sha256": hashlib.sha256(b"".join(parts)).hexdigest()}
    r = requests.put(f"http://127.0.0.1:{port}/upload", data=b"a" * 100_000, timeout=30)  # Content-Length
    assert r.json()["bytes"] == 100_000


def test_expect_100_continue_and_a_stalled_streamed_body(served):
    port, _ = served
    s = connect(port)
    s.sendall(raw("PUT", "/upload", headers={"Content-Length": "5", "Expect": "100-continue"}))
    assert s.recv(100).startswith(b"HTTP/1.1 100 ")
    s.sendall(b"hello")
    status, _, body = responses(s, ["PUT"])[0]
    assert status == 200 and b'"bytes":5' in body
    stalled = connect(port)
    stalled.sendall(raw("PUT", "/upload", headers={"Transfer-Encoding": "chunked"}) + chunk(b"x" * 10))
    t = time.monotonic()
    status, headers, _ = responses(stalled, ["PUT"])[0]
    assert status == 408 and headers["connection"] == "close" and time.monotonic() - t < 5


def test_short_bodies_chunked_and_over_the_cap(served):
    port, _ = served
    s = connect(port)
    s.sendall(raw("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) + chunk(b"a" * 1000)
              + chunk(b"b" * 24) + b"0\r\n\r\n")
    status, _, body = responses(s, ["POST"])[0]
    assert status == 200 and body == b'{"bytes":1024}\n'
    s.sendall(raw("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) + chunk(b"c" * 5000) + b"0\r\n\r\n")
    status, headers, _ = responses(s, ["POST"])[0]
    assert status == 413 and headers["connection"] == "close"
    big = connect(port)  # declared too large: answered without reading the body
    big.sendall(raw("POST", "/echo", headers={"Content-Length": str(10**9)}))
    assert responses(big, ["POST"])[0][0] == 413


def test_pipelined_keepalive_and_head(served):
    port, _ = served
    s = connect(port)
    s.sendall(raw("GET", "/hello") + raw("HEAD", "/hello") + raw("POST", "/echo", body=b"xyz")
              + raw("GET", "/nowhere"))
    got = responses(s, ["GET", "HEAD", "POST", "GET"])
    assert [g[0] for g in got] == [200, 200, 200, 404]
    assert got[0][2] == b'{"hello":"world"}\n'
    assert got[1][2] == b"" and got[1][1]["content-length"] == str(len(got[0][2]))
    assert got[2][2] == b'{"bytes":3}\n'
    s.sendall(raw("GET", "/hello"))  # the same connection still serves
    assert responses(s, ["GET"])[0][0] == 200
    for _ in range(3):  # a long poll, then a body sent in two parts, on one kept-alive connection
        s.sendall(raw("GET", "/poll"))
        assert responses(s, ["GET"])[0][2] == b'{"done":true}\n'
        s.sendall(raw("POST", "/echo", headers={"Content-Length": "4"}))
        time.sleep(0.05)
        s.sendall(b"abcd")
        assert responses(s, ["POST"])[0][2] == b'{"bytes":4}\n'


def test_a_client_that_never_reads_a_stream_stalls_only_itself(served):
    port, closed = served
    s = connect(port, rcvbuf=4096)
    s.sendall(raw("GET", "/firehose"))
    t = time.monotonic()
    other = connect(port)
    other.sendall(raw("GET", "/hello"))
    assert responses(other, ["GET"])[0][0] == 200
    assert closed.wait(10), "the stream of a client that reads nothing was not ended"
    assert time.monotonic() - t < 10
    assert closed_within(s, 10) is not None
