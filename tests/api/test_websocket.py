"""Websockets on agent/httpserver.py, in-process in front of a small Flask app, with a real
client library (websockets): echo, close codes, the plain HTTP answer of a refused upgrade,
the stream caps, a silent client dropped after its ping, a client that stops reading, and
a message over the size limit."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import threading
import time

import pytest
import requests
from flask import Flask, abort, request
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from agent.api import WS_PROTOCOL, websocket
from agent.config import ApiConfig
from agent.errors import AgentError
from agent.httpserver import WS_MAX_MESSAGE, HttpServer, WebSocketClosed
from agent.server import listen
from tests.api.serving import closed_within, connect, recv_until
from tests.api.test_httpserver import running
from tests.api.test_tls import pki  # noqa: F401 (a fixture)


def _app(events: dict) -> Flask:
    app = Flask("served")
    app.register_error_handler(AgentError, lambda e: ({"error": e.to_dict()}, e.http_status))

    @app.get("/echo")
    def echo():
        if request.headers.get("Authorization") != "Bearer good":
            abort(401)

        def session(ws):
            while (msg := ws.recv()) is not None:
                if msg == "bye":
                    ws.close(4001, "asked to")
                    return
                ws.send(msg)
        return websocket(session)

    @app.get("/flood")  # sends until the client is gone
    def flood():
        def session(ws):
            try:
                while True:
                    ws.send(b"z" * 65536)
            except WebSocketClosed:
                events["flood_ended"].set()
        return websocket(session)

    @app.get("/hello")
    def hello():
        return {"hello": "world"}

    return app


@pytest.fixture
def served():
    events = {"flood_ended": threading.Event()}
    server = HttpServer(_app(events), ApiConfig(write_timeout=1, ws_ping_interval=0.5,
                                                max_streams_per_client=3),
                        frozenset({"echo", "flood"}))
    with running(server) as port:
        yield port, events


def _ws(port, path="/echo", **kw):
    return ws_connect(f"ws://127.0.0.1:{port}{path}", additional_headers={"Authorization": "Bearer good"},
                      subprotocols=[WS_PROTOCOL], open_timeout=5, **kw)


def test_echo_close_code_and_subprotocol(served):
    port, _ = served
    with _ws(port) as c:
        assert c.subprotocol == WS_PROTOCOL
        c.send("hello")
        assert c.recv(5) == "hello"
        c.send(b"\x00\xff" * 1000)
        assert c.recv(5) == b"\x00\xff" * 1000
        c.ping()  # answered by the server (the client's keepalive would fail otherwise)
        c.send("bye")
        with pytest.raises(ConnectionClosed) as e:
            c.recv(5)
        assert e.value.rcvd.code == 4001 and e.value.rcvd.reason == "asked to"


def test_a_refused_upgrade_is_a_plain_answer_and_a_plain_get_is_told_to_upgrade(served):
    port, _ = served
    with pytest.raises(InvalidStatus) as e:
        ws_connect(f"ws://127.0.0.1:{port}/echo", open_timeout=5)
    assert e.value.response.status_code == 401
    r = requests.get(f"http://127.0.0.1:{port}/echo", headers={"Authorization": "Bearer good"}, timeout=5)
    assert r.status_code == 400 and "websocket" in r.text


def test_sessions_count_against_the_stream_caps(served):
    port, _ = served
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(_ws(port))
        with pytest.raises(InvalidStatus) as e:
            _ws(port)
        assert e.value.response.status_code == 503
        assert requests.get(f"http://127.0.0.1:{port}/hello", timeout=5).json() == {"hello": "world"}
    deadline = time.monotonic() + 5  # their threads end and give back their slots
    while True:
        try:
            with _ws(port) as c:
                c.send("x")
                assert c.recv(5) == "x"
            break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def _handshake(port, path="/echo", rcvbuf=None) -> object:
    s = connect(port, rcvbuf=rcvbuf)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer good\r\nConnection: Upgrade\r\n"
               f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode())
    assert recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
    return s


def test_a_silent_client_is_pinged_then_dropped(served):
    port, _ = served
    s = _handshake(port)  # never answers the ping
    assert closed_within(s, 10) is not None
    with _ws(port) as c:  # a client that answers pings stays
        time.sleep(1.5)
        c.send("still here")
        assert c.recv(5) == "still here"


def test_a_client_that_stops_reading_stalls_only_its_session(served):
    port, events = served
    s = _handshake(port, "/flood", rcvbuf=4096)
    with _ws(port) as c:  # others are served meanwhile
        c.send("ok")
        assert c.recv(5) == "ok"
    assert requests.get(f"http://127.0.0.1:{port}/hello", timeout=5).status_code == 200
    assert events["flood_ended"].wait(15)  # dropped after write_timeout: its thread ends
    s.close()


def test_a_message_over_the_limit_closes_with_1009(served):
    port, _ = served
    with _ws(port, max_size=None) as c:
        c.send(b"x" * (WS_MAX_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as e:
            c.recv(10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009


def test_wss_with_a_client_certificate(pki):  # noqa: F811 (the fixture from test_tls)
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    ctx.load_verify_locations(str(pki / "ca.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = HttpServer(_app({}), ApiConfig(), frozenset({"echo"}), ctx)
    sock = listen("127.0.0.1:0")
    loop = asyncio.new_event_loop()
    box, ready = {}, threading.Event()

    async def main():
        box["stop"] = asyncio.Event()
        ready.set()
        await server.serve(sock, box["stop"])

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    ready.wait(5)
    try:
        client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        client.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        with ws_connect(f"wss://127.0.0.1:{sock.getsockname()[1]}/echo", ssl=client, open_timeout=5,
                        additional_headers={"Authorization": "Bearer good"}) as c:
            c.send("over tls" * 10000)  # several TLS records each way
            assert c.recv(5) == "over tls" * 10000
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        t.join(15)


def test_a_stopping_server_closes_sessions_with_1001():
    server = HttpServer(_app({}), ApiConfig(), frozenset({"echo"}))
    sock = listen("127.0.0.1:0")
    loop = asyncio.new_event_loop()
    box, ready = {}, threading.Event()

    async def main():
        box["stop"] = asyncio.Event()
        ready.set()
        await server.serve(sock, box["stop"])

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    ready.wait(5)
    with _ws(sock.getsockname()[1]) as c:
        c.send("before")
        assert c.recv(5) == "before"
        loop.call_soon_threadsafe(box["stop"].set)
        with pytest.raises(ConnectionClosed) as e:
            c.recv(15)
        # a close frame, not the cut at the end of the grace period
        assert e.value.rcvd is not None and e.value.rcvd.code == 1001
    t.join(15)
    assert not t.is_alive()
