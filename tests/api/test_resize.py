"""Resize and autostart through PATCH /v1/instances/{id}, on the fake driver and runtime
in-process: every validation path (422 naming the maximum or the host's capacity, 400/403),
nothing changed when refused or when the driver fails, live on running instances and kept
for the next start of stopped ones, an event per change; and the desired state after a
host reboot (told from an agent restart by the boot id)."""
from __future__ import annotations

import os
from unittest import mock

import pytest

from agent.errors import CommandFailed
from tests.api.conftest import inprocess_app

VM = {"kind": "vm", "image": "tiny-vm", "memory_mib": 192}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from testbed.ocibuild import busybox_layers, write_layout
    tmp = tmp_path_factory.mktemp("resize")
    (tmp / "boot_id").write_text("boot-1\n")
    app, client, root = inprocess_app(tmp, boot_id_path=str(tmp / "boot_id"))
    layout = write_layout(str(tmp / "busybox"), {"latest": busybox_layers()})
    op = client.post("/v1/images", json={"name": "busybox", "source": {"type": "file", "path": layout},
                                         "format": "oci"}).json
    assert _wait(client, op)["status"] == "succeeded"
    yield app, client, root, tmp
    app.config["SERVICES"].stop()  # the reboot test puts new services in


def _wait(client, op):
    return client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json


def _create(client, **body):
    r = client.post("/v1/instances", json=body)
    assert r.status_code == 202, r.json
    op = _wait(client, r.json)
    assert op["status"] == "succeeded", op
    return op["result"]["instance"]


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.json)
    return r.json["error"]["message"]


def test_a_vm_resizes_live_up_to_its_maximum(app):
    _, client, root, _ = app
    inst = _create(client, **VM, name="rs-vm", cpus=1, max_cpus=3, max_memory_mib=512)
    assert (inst["cpus"], inst["memory_mib"], inst["max_cpus"], inst["max_memory_mib"]) == (1, 192, 3, 512)
    assert root.driver.get("rs-vm").max_cpus == 3 and root.driver.get("rs-vm").max_memory_mib == 512
    r = client.patch("/v1/instances/rs-vm", json={"cpus": 3, "memory_mib": 384})
    assert r.status_code == 200, r.json
    assert (r.json["cpus"], r.json["memory_mib"], r.json["max_cpus"]) == (3, 384, 3)
    info = root.driver.get("rs-vm")
    assert (info.state, info.cpus, info.memory_mib) == ("running", 3, 384)  # the stateful fake has it
    assert client.get("/v1/instances/rs-vm").json["cpus"] == 3
    # down again, memory only: the vCPUs stay
    r = client.patch("/v1/instances/rs-vm", json={"memory_mib": 256})
    assert r.status_code == 200 and (r.json["cpus"], r.json["memory_mib"]) == (3, 256), r.json
    assert root.driver.get("rs-vm").memory_mib == 256
    # fewer vCPUs only while stopped, kept for the next start
    r = client.post("/v1/instances/rs-vm/actions", json={"action": "stop", "force": True})
    assert r.status_code == 202 and _wait(client, r.json)["status"] == "succeeded", r.json
    r = client.patch("/v1/instances/rs-vm", json={"cpus": 1})
    assert r.status_code == 200 and r.json["cpus"] == 1, r.json
    assert root.driver.get("rs-vm").cpus == 1


@pytest.mark.parametrize("body, status, words", [
    ({"cpus": 4}, 422, "at most 3 vCPUs (its max_cpus"),
    ({"memory_mib": 513}, 422, "at most 512 MiB (its max_memory_mib"),
    ({"cpus": 2, "memory_mib": 4096}, 422, "max_memory_mib"),  # the valid half is not applied either
    ({"cpus": 1.5}, 422, "whole vCPUs"),
    ({"memory_mib": 8}, 422, "at least 16"),
    ({"cpus": 0}, 422, "cpus"),
    ({"cpus": "2"}, 422, "cpus"),
    ({"cpus": None}, 422, "cpus"),
    ({"memory_mib": 2**40}, 422, "memory_mib"),
    ({"max_cpus": 8}, 422, "max_cpus"),  # fixed at create
    ({"cpus": 1}, 409, "only added (hot-plug); stop it"),  # no live unplug
    ({"cpus": 1, "memory_mib": 256}, 409, "only added"),  # the valid half is not applied either
    ({}, 422, "nothing to change"),
    ({"autostart": "yes"}, 422, "autostart"),
])
def test_bad_vm_resizes_are_refused_and_change_nothing(app, body, status, words):
    _, client, root, _ = app
    if client.get("/v1/instances/rs-bad").status_code == 404:
        _create(client, **VM, name="rs-bad", cpus=2, max_cpus=3, max_memory_mib=512)
    msg = _err(client.patch("/v1/instances/rs-bad", json=body), status)
    assert words in msg, msg
    inst = client.get("/v1/instances/rs-bad").json
    assert (inst["cpus"], inst["memory_mib"]) == (2, 192)
    info = root.driver.get("rs-bad")
    assert (info.cpus, info.memory_mib) == (2, 192)


def test_a_reader_cannot_resize_and_an_unknown_instance_is_404(app):
    _, client, root, _ = app
    reader = root.tokens.create("rs-reader", "reader")
    r = client.patch("/v1/instances/rs-bad", json={"cpus": 1}, headers={"Authorization": f"Bearer {reader}"})
    _err(r, 403)
    _err(client.patch("/v1/instances/rs-nosuch", json={"cpus": 1}), 404)


@pytest.mark.parametrize("body, words", [
    ({"max_cpus": 1}, "max_cpus (1) is below cpus (2)"),
    ({"max_memory_mib": 128}, "max_memory_mib (128) is below memory_mib (192)"),
    ({"max_cpus": 256}, "max_cpus"),
])
def test_bad_maxima_at_create_are_422_and_leave_nothing(app, body, words):
    _, client, _, _ = app
    msg = _err(client.post("/v1/instances", json={**VM, "name": "rs-max", "cpus": 2, **body}), 422)
    assert words in msg, msg
    assert client.get("/v1/instances/rs-max").status_code == 404


def test_a_maximum_past_the_host_fails_the_create_and_leaves_nothing(app):
    _, client, root, _ = app
    r = client.post("/v1/instances", json={**VM, "name": "rs-huge", "max_memory_mib": 1024 * 1024})
    op = _wait(client, r.json)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "max_memory_mib" in op["error"]["message"]
    assert client.get("/v1/instances/rs-huge").status_code == 404 and root.driver.find("rs-huge") is None


def test_containers_take_no_maximum(app):
    _, client, _, _ = app
    msg = _err(client.post("/v1/instances", json={"kind": "container", "image": "busybox", "name": "rs-cm",
                                                  "max_cpus": 2}), 422)
    assert "max_cpus is for VMs" in msg, msg


def test_a_stopped_vm_resizes_in_its_definition_and_starts_with_it(app):
    _, client, root, _ = app
    inst = _create(client, **VM, name="rs-off", max_cpus=2, start=False)
    assert inst["state"] == "stopped"
    r = client.patch("/v1/instances/rs-off", json={"cpus": 2, "memory_mib": 160})
    assert r.status_code == 200, r.json
    op = _wait(client, client.post("/v1/instances/rs-off/actions", json={"action": "start"}).json)
    assert op["status"] == "succeeded", op
    info = root.driver.get("rs-off")
    assert (info.state, info.cpus, info.memory_mib) == ("running", 2, 160)


def test_a_container_resizes_live_up_to_the_host(app):
    _, client, root, _ = app
    _create(client, kind="container", image="busybox", name="rs-ct", cpus=0.5, memory_mib=64, pids_max=50,
            command=["sleep", "600"])
    r = client.patch("/v1/instances/rs-ct", json={"cpus": 1, "memory_mib": 96})
    assert r.status_code == 200, r.json
    assert (r.json["cpus"], r.json["memory_mib"], r.json["max_cpus"]) == (1, 96, None)
    limits = root.runtime.stats("rs-ct")["limits"]
    assert (limits["cpus"], limits["memory_mib"], limits["pids_max"]) == (1, 96, 50)  # pids_max kept
    host_cpus = os.cpu_count()
    msg = _err(client.patch("/v1/instances/rs-ct", json={"cpus": host_cpus + 1}), 422)
    assert f"this host has {host_cpus} cpus" in msg, msg
    msg = _err(client.patch("/v1/instances/rs-ct", json={"memory_mib": 1024 * 1024}), 422)
    assert "MiB but this host has" in msg, msg
    _err(client.patch("/v1/instances/rs-ct", json={"cpus": 0.001}), 422)
    assert root.runtime.stats("rs-ct")["limits"]["memory_mib"] == 96
    assert client.get("/v1/instances/rs-ct").json["memory_mib"] == 96


def test_a_runtime_failure_changes_nothing_and_undoes_what_it_set(app):
    _, client, root, _ = app
    if client.get("/v1/instances/rs-ct2").status_code == 404:
        _create(client, kind="container", image="busybox", name="rs-ct2", memory_mib=64, command=["sleep", "600"])
    real = root.runtime.update_limits
    calls = []

    def half(name, limits):  # runc set the cpu quota, then the memory controller refused
        calls.append(limits)
        real(name, limits)
        if len(calls) == 1:
            raise CommandFailed("runc update failed: memory: device or resource busy")

    with mock.patch.object(root.runtime, "update_limits", side_effect=half):
        r = client.patch("/v1/instances/rs-ct2", json={"cpus": 2, "memory_mib": 32})
    assert r.status_code >= 400, r.json
    assert "device or resource busy" in r.json["error"]["message"]
    assert len(calls) == 2 and (calls[1].cpus, calls[1].memory_mib) == (1, 64)  # the old limits again
    assert root.runtime.stats("rs-ct2")["limits"]["memory_mib"] == 64
    inst = client.get("/v1/instances/rs-ct2").json
    assert (inst["cpus"], inst["memory_mib"]) == (1, 64)


def test_a_driver_failure_leaves_the_record_and_the_bandwidth_as_they_were(app):
    _, client, root, _ = app
    _create(client, **VM, name="rs-fail", max_cpus=2)
    with mock.patch.object(root.driver, "resize", side_effect=CommandFailed("libvirt failed: no")):
        r = client.patch("/v1/instances/rs-fail", json={"cpus": 2, "bandwidth": {"egress_kbit": 1000}})
    assert r.status_code >= 400, r.json
    inst = client.get("/v1/instances/rs-fail").json
    assert (inst["cpus"], inst["bandwidth"]) == (1, None)
    assert not root.driver.bandwidth("rs-fail").limited  # the limits it had (none) again


def test_each_change_is_an_event(app):
    _, client, root, _ = app
    if client.get("/v1/instances/rs-ev").status_code == 404:
        _create(client, **VM, name="rs-ev", max_memory_mib=256)
    seen = []
    with mock.patch.object(root.events, "publish", side_effect=lambda t, d: seen.append((t, d))):
        assert client.patch("/v1/instances/rs-ev", json={"memory_mib": 256, "autostart": False}).status_code == 200
    assert [d.get("changed") for t, d in seen if t == "lifecycle"] == [["autostart", "memory_mib"]]
    assert client.get("/v1/instances/rs-ev").json["autostart"] is False


def test_image_gc_is_admin_only_and_keeps_what_instances_use(app):
    _, client, root, _ = app
    reader = root.tokens.create("gc-reader", "reader")
    _err(client.post("/v1/images/gc", json={}, headers={"Authorization": f"Bearer {reader}"}), 403)
    r = client.post("/v1/images/gc", json={})
    assert r.status_code == 202, r.json
    op = _wait(client, r.json)
    assert op["status"] == "succeeded" and {"bytes_freed", "blobs_removed", "layers_removed"} <= set(op["result"])
    used = _create(client, **VM, name="gc-vm", start=False)
    op = _wait(client, client.post("/v1/images/gc", json={}).json)
    assert op["status"] == "succeeded", op
    assert client.get("/v1/images/tiny-vm").status_code == 200
    _err(client.delete("/v1/images/tiny-vm"), 409)
    assert root.store.references(used["image"]), "the instance's disk still refers to its image"
    assert client.delete("/v1/instances/gc-vm").status_code == 200


def _restart(app, tmp, boot_id):
    """Stop the agent's services and start new ones on the same state dir and the same (fake)
    driver and runtime, with ``boot_id`` as the kernel's; the new root."""
    from agent.services import Services
    _, _, root, _ = app
    driver, runtime = root.driver, root.runtime
    root.stop()
    (tmp / "boot_id").write_text(boot_id + "\n")
    new = Services(root.config, db=root.db)
    new._driver, new._runtime = driver, runtime
    new.start()
    app[0].config["SERVICES"] = new
    return new


def test_after_a_host_reboot_what_was_running_with_autostart_starts_again(app):
    _, client, root, tmp = app
    for i in root.records.list():  # a clean slate: this test counts what starts
        client.delete(f"/v1/instances/{i.name}")
    _create(client, **VM, name="up-auto")
    _create(client, **VM, name="up-noauto", autostart=False)
    _create(client, **VM, name="down-auto", start=False)
    _create(client, kind="container", image="busybox", name="ct-auto", memory_mib=64, command=["sleep", "600"])
    _create(client, **VM, name="paused-auto")
    assert client.post("/v1/instances/paused-auto/actions", json={"action": "pause"}).status_code == 202
    # an agent restart (same boot): a VM that stopped meanwhile is re-adopted as stopped, not started
    root.driver.stop("up-auto", force=True)
    root = _restart(app, tmp, "boot-1")
    assert root.records.find_name("up-auto").state == "stopped"
    assert root.driver.get("up-auto").state == "stopped"
    client.post("/v1/instances/up-auto/actions", json={"action": "start"})
    _wait_state(root, "up-auto", "running")
    # the host reboots: every workload is gone, the records still say what ran
    for name in ("up-auto", "up-noauto", "paused-auto"):
        root.driver.stop(name, force=True)
    root.runtime.kill("ct-auto", 9)
    root = _restart(app, tmp, "boot-2")
    for name in ("up-auto", "paused-auto"):
        _wait_state(root, name, "running")
    _wait_state(root, "ct-auto", "running")
    assert root.driver.get("up-noauto").state == "stopped"  # autostart false
    assert root.driver.get("down-auto").state == "stopped"  # it was stopped when the host went down
    assert root.records.find_name("up-noauto").state == "stopped"
    # nothing is left pending: a restart after that starts nothing more
    root.driver.stop("up-auto", force=True)
    root = _restart(app, tmp, "boot-2")
    assert root.driver.get("up-auto").state == "stopped"


def _wait_state(root, name, state):
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        inst = root.records.find_name(name)
        if inst is not None and inst.state == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} is {root.records.find_name(name)}, not {state}")
