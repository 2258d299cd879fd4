"""A real VM's serial console over the websocket API: the test guest (boot.qcow2, TCG) runs a
user-data script that reads its serial line and answers each line; an admin types into the
console and reads the answer, a reader watching the same console sees it too."""
from __future__ import annotations

import json
import secrets
import time

import pytest
from websockets.sync.client import connect as ws_connect

from testbed.agentproc import Api
from tests.api.test_vm_boot import (OP_TIMEOUT_S, bridge, import_boot_image, start_agent,  # noqa: F401 (fixtures)
                                    stop_agent, vmtmp)

pytestmark = pytest.mark.real
ANSWER_TIMEOUT_S = 180  # boot under TCG on a loaded machine, then the script's first answer
USER_DATA = ("#!/bin/sh\necho NODEAGENT-CONSOLE-LISTENING\n"
             "while read -r l < /dev/ttyS0; do echo \"NODEAGENT-ECHO $l\" > /dev/ttyS0; done\n")


def test_type_into_a_real_vm_console_and_read_the_answer(libvirtd, guest_images, vmtmp, bridge):  # noqa: F811
    agent = start_agent(vmtmp / "console", libvirtd, bridge)
    reader_token = agent.token("reader", "reader")
    api = Api(agent.url, agent.token_value)
    name = f"apicons-{secrets.token_hex(3)}"
    url = agent.url.replace("http://", "ws://") + f"/v1/instances/{name}/console"
    try:
        image = import_boot_image(api, guest_images["boot"])
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": image["id"], "cpus": 1,
                                                      "memory_mib": 192, "network": "none",
                                                      "user_data": USER_DATA}).json(), timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op["error"]
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {agent.token_value}"},
                        open_timeout=10, max_size=None) as admin, \
                ws_connect(url, additional_headers={"Authorization": f"Bearer {reader_token}"},
                           open_timeout=10, max_size=None) as reader:
            word = f"w{secrets.token_hex(4)}"
            seen, typed_at = b"", 0.0
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while f"NODEAGENT-ECHO {word}".encode() not in seen:  # typed again until the script listens
                assert time.monotonic() < deadline, f"no answer on the console: {seen[-2000:]!r}"
                if time.monotonic() - typed_at > 3:
                    admin.send(f"{word}\r".encode())
                    typed_at = time.monotonic()
                try:
                    msg = admin.recv(0.5)
                except TimeoutError:
                    continue
                if isinstance(msg, bytes):
                    seen += msg
            watched = b""
            while f"NODEAGENT-ECHO {word}".encode() not in watched:  # the reader saw the same output
                msg = reader.recv(10)
                watched += msg if isinstance(msg, bytes) else b""
            reader.send(b"typed-by-a-reader\r")
            while True:
                msg = reader.recv(10)
                if isinstance(msg, str):
                    assert "read-only" in json.loads(msg)["message"]
                    break
    finally:
        api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)
