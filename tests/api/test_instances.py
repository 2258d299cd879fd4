"""Images and instances end to end through a real server (fake driver, runtime and pool)."""
import json
import threading

import requests

from tests.api.conftest import assert_error


def _create(api, **body):
    r = api.post("/v1/instances", json=body)
    assert r.status_code == 202, r.text
    op = r.json()
    assert op["kind"] == "instance.create" and op["status"] in ("pending", "running", "succeeded")
    return api.wait(op)


def test_images_list_get_and_import_errors(admin, images, tmp_path):
    listed = {i["name"]: i for i in admin.get("/v1/images").json()["images"]}
    assert listed["busybox"]["kind"] == "container" and listed["tiny-vm"]["kind"] == "vm"
    img = images["container"]
    assert admin.get(f"/v1/images/{img['id']}").json()["name"] == "busybox"
    assert admin.get(f"/v1/images/{img['id'][:12]}").json()["id"] == img["id"]
    assert_error(admin.get("/v1/images/nosuch"), 404)
    # tmp_path is under the agent's import dir (testbed/agentproc.py); /etc is not
    assert_error(admin.post("/v1/images", json={"name": "x", "source": {"type": "file",
                                                                        "path": str(tmp_path / "nonexistent")}}),
                 404)
    assert_error(admin.post("/v1/images", json={"name": "x", "source": {"type": "file", "path": "/nonexistent"}}),
                 403, "forbidden")
    assert_error(admin.post("/v1/images", json={"name": "x", "source": {"type": "file", "path": "rel/path"}}), 422)
    assert_error(admin.post("/v1/images", json={"name": "x", "source": {"type": "ftp", "path": "/x"}}), 422)
    assert_error(admin.post("/v1/images", json={"name": "x", "source": {"type": "s3", "pool": "p", "bucket": "k"}}),
                 422, "unprocessable")
    junk = tmp_path / "hostname"
    junk.write_text("not a disk image\n")
    assert_error(admin.post("/v1/images", json={"name": "x", "pool": "nope",
                                                "source": {"type": "file", "path": str(junk)}}), 404)
    # a file that is not a disk image: the operation fails, nothing is stored
    r = admin.post("/v1/images", json={"name": "junk", "source": {"type": "file", "path": str(junk)},
                                       "format": "qcow2"})
    op = admin.wait(r.json())
    assert op["status"] == "failed" and op["error"]["message"]
    assert "junk" not in {i["name"] for i in admin.get("/v1/images").json()["images"]}


def test_container_lifecycle(admin, reader, images):
    op = _create(admin, name="web", kind="container", image="busybox", cpus=0.5, memory_mib=64,
                 env={"GREETING": "hi"}, command=["/bin/sh", "-c", "echo started; sleep 1000"])
    assert op["status"] == "succeeded", op["error"]
    inst = op["result"]["instance"]
    assert inst["state"] == "running" and inst["ip"] and inst["volumes"]
    assert reader.get("/v1/instances/web").json()["id"] == inst["id"]
    assert reader.get(f"/v1/instances/{inst['id']}").json()["name"] == "web"
    res = admin.post("/v1/instances/web/exec", json={"command": ["echo", "hello"]}).json()
    assert res["exit_code"] == 0 and "hello" in res["stdout"]
    assert_error(reader.post("/v1/instances/web/exec", json={"command": ["true"]}), 403)
    assert "logs" in reader.get("/v1/instances/web/logs", params={"tail": 10}).json()
    stats = reader.get("/v1/instances/web/stats").json()
    assert stats["memory_bytes"] is not None
    for action, state in (("pause", "paused"), ("resume", "running"), ("stop", "stopped"),
                          ("start", "running"), ("restart", "running"), ("kill", "stopped")):
        r = admin.post("/v1/instances/web/actions", json={"action": action, "timeout": 5})
        assert r.status_code == 202, r.text
        done = admin.wait(r.json())
        assert done["status"] == "succeeded", done
        assert done["result"]["instance"]["state"] == state, (action, done)
    # the image is in use: 409
    assert_error(admin.delete(f"/v1/images/{images['container']['id']}"), 409, "conflict")
    assert admin.delete("/v1/instances/web").json() == {"deleted": True}
    assert_error(admin.get("/v1/instances/web"), 404)


def test_vm_lifecycle(admin, images):
    op = _create(admin, name="vm1", kind="vm", image="tiny-vm", cpus=1, memory_mib=128, user_data="#cloud-config\n")
    assert op["status"] == "succeeded", op["error"]
    inst = op["result"]["instance"]
    assert inst["kind"] == "vm" and inst["state"] == "running" and inst["mac"].startswith("52:54:00:")
    assert admin.get("/v1/instances/vm1/stats").json()["cpu_ns"] is not None
    r = admin.post("/v1/instances/vm1/actions", json={"action": "stop", "force": True})
    assert admin.wait(r.json())["result"]["instance"]["state"] == "stopped"
    assert_error(admin.post("/v1/instances/vm1/exec", json={"command": ["ls"]}), 422)
    assert admin.delete("/v1/instances/vm1").json() == {"deleted": True}


def test_create_refusals_leave_nothing(admin, images):
    before = admin.get("/v1/instances").json()["instances"]
    assert_error(admin.post("/v1/instances", json={"name": "x1", "kind": "container", "image": "nosuch"}), 404)
    assert_error(admin.post("/v1/instances", json={"name": "x1", "kind": "vm", "image": "busybox"}), 422)
    assert_error(admin.post("/v1/instances", json={"name": "x1", "kind": "container", "image": "busybox",
                                                   "pool": "nope"}), 404)
    assert _create(admin, name="dup", kind="container", image="busybox")["status"] == "succeeded"
    assert_error(admin.post("/v1/instances", json={"name": "dup", "kind": "container", "image": "busybox"}), 409)
    admin.delete("/v1/instances/dup")
    assert admin.get("/v1/instances").json()["instances"] == before


def test_failed_create_cleans_up_everything(agent, admin, images):
    port = {"host_port": 18080, "container_port": 80}
    p1 = _create(admin, name="p1", kind="container", image="busybox", ports=[port])
    assert p1["status"] == "succeeded"
    assert list(agent.state_dir.rglob(f"*i-{p1['target'][:12]}-rootfs*")), "volumes are findable by name"
    op = _create(admin, name="p2", kind="container", image="busybox", ports=[port])  # port taken: runtime refuses
    assert op["status"] == "failed" and op["error"]["code"] == "conflict", op
    assert_error(admin.get("/v1/instances/p2"), 404)
    volume = f"i-{op['target'][:12]}-rootfs"  # the rootfs volume the failed create had made
    assert not [p for p in agent.state_dir.rglob(f"*{volume}*")], "rootfs volume left behind"
    assert not (agent.state_dir / "instances" / op["target"]).exists()
    admin.delete("/v1/instances/p1")
    assert admin.get("/v1/instances").json()["instances"] == []


def test_fifty_parallel_creates_all_succeed(admin, images):
    names = [f"par{i}" for i in range(50)]
    ops, errors = {}, []

    def create(n):
        try:
            r = requests.post(admin.url + "/v1/instances", headers=admin.s.headers, timeout=60,
                              json={"name": n, "kind": "container", "image": "busybox", "memory_mib": 32})
            assert r.status_code == 202, r.text
            ops[n] = r.json()
        except Exception as e:  # collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    results = [admin.wait(ops[n], timeout=120) for n in names]
    assert all(o["status"] == "succeeded" for o in results), [o for o in results if o["status"] != "succeeded"][:2]
    assert sum(i["state"] == "running" for i in admin.get("/v1/instances").json()["instances"]) >= 50
    ips = {o["result"]["instance"]["ip"] for o in results}
    assert len(ips) == 50
    for n in names:
        assert admin.delete(f"/v1/instances/{n}").status_code == 200
    assert admin.get("/v1/instances").json()["instances"] == []


def test_events_stream_with_type_filter(agent, admin, images):
    seen, ready = [], threading.Event()

    def listen():
        with requests.get(agent.url + "/v1/events", params={"type": "lifecycle", "timeout": 20, "heartbeat": 0.5},
                          headers=admin.s.headers, stream=True, timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines(decode_unicode=True):
                ready.set()
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((event, json.loads(line[6:])))
                    if seen[-1][1]["data"].get("state") == "deleted":
                        return
    t = threading.Thread(target=listen)
    t.start()
    assert ready.wait(10)
    _create(admin, name="ev", kind="container", image="busybox")
    admin.delete("/v1/instances/ev")
    t.join(30)
    assert {e for e, _ in seen} == {"lifecycle"}  # no operation events: filtered out
    states = [d["data"]["state"] for _, d in seen if d["data"]["name"] == "ev"]
    assert states[0] == "creating" and "running" in states and states[-1] == "deleted"


def test_metrics_count_operations_and_instances(admin, reader, images):
    _create(admin, name="m1", kind="container", image="busybox")
    text = reader.get("/metrics").text
    assert 'nodeagent_operations{kind="instance.create",status="succeeded"}' in text
    assert 'nodeagent_instances{kind="container",state="running"}' in text
    assert 'nodeagent_instance_memory_bytes{kind="container",name="m1"}' in text
    assert 'nodeagent_instance_oom_kills_total{kind="container",name="m1"}' in text
    admin.delete("/v1/instances/m1")


def test_image_import_from_url_reports_progress(admin, tmp_path):
    """A URL import from a local HTTP server (127.0.0.1) on this test's own port."""
    import functools
    import http.server
    import subprocess

    disk = tmp_path / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/web.qcow2"
        op = admin.wait(admin.post("/v1/images",
                                   json={"name": "from-web", "source": {"type": "url", "url": url}}).json())
        assert op["status"] == "succeeded", op
        assert op["progress"]["phase"] == "download" and op["progress"]["bytes_done"] == disk.stat().st_size
        assert op["result"]["image"]["format"] == "qcow2"
        missing = admin.wait(admin.post("/v1/images", json={"name": "nope", "source": {
            "type": "url", "url": url.replace("web.qcow2", "absent.qcow2")}}).json())
        assert missing["status"] == "failed" and missing["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
    assert admin.delete("/v1/images/from-web").json() == {"deleted": True}


def test_registry_import_then_run(admin, busybox_ref):
    """The operator's path: pull an image from a registry through the API, run it, remove both."""
    r = admin.post("/v1/images", json={"name": "pulled-busybox",
                                      "source": {"type": "registry", "reference": busybox_ref,
                                                 "tls_verify": False}})
    assert r.status_code == 202, r.text
    op = admin.wait(r.json())
    assert op["status"] == "succeeded", op
    image = op["result"]["image"]
    assert image["kind"] == "container" and image["layers"]
    op = _create(admin, name="pulled", kind="container", image="pulled-busybox",
                 command=["/bin/sh", "-c", "sleep 1000"])
    assert op["status"] == "succeeded", op["error"]
    res = admin.post("/v1/instances/pulled/exec", json={"command": ["hostname"]}).json()
    assert res["exit_code"] == 0 and res["stdout"].strip()
    assert admin.delete("/v1/instances/pulled").json() == {"deleted": True}
    assert admin.delete(f"/v1/images/{image['id']}").json() == {"deleted": True}
    assert_error(admin.get(f"/v1/images/{image['id']}"), 404)


def test_registry_import_of_unknown_image_fails_cleanly(admin, oci_registry):
    before = admin.get("/v1/images").json()
    r = admin.post("/v1/images", json={"name": "nope", "source": {
        "type": "registry", "reference": f"{oci_registry.address}/does-not-exist:1",
        "tls_verify": False}})
    assert r.status_code == 202, r.text
    op = admin.wait(r.json())
    assert op["status"] == "failed" and op["error"]["message"], op
    assert admin.get("/v1/images").json() == before


def test_the_list_follows_every_write_as_each_instance_reads(admin, reader, images):
    """GET /v1/instances is re-rendered per written record (issue #20): after a create, an
    update, a failed start and a delete it shows exactly what each record's own GET shows,
    for an admin and (errors redacted) for a reader, in creation order."""
    names = ["lst-a", "lst-b", "lst-c"]
    for n in names:
        assert _create(admin, name=n, kind="container", image="busybox", network="none",
                       command=["sleep", "1000"])["status"] == "succeeded"

    def check():
        for api in (admin, reader):
            listed = [i for i in api.get("/v1/instances").json()["instances"] if i["name"].startswith("lst-")]
            assert listed == [api.get(f"/v1/instances/{i['name']}").json() for i in listed]
            assert [i["created_at"] for i in listed] == sorted(i["created_at"] for i in listed)
        return {i["name"]: i for i in admin.get("/v1/instances").json()["instances"]}

    first = check()
    flipped = not first["lst-b"]["autostart"]
    assert admin.patch("/v1/instances/lst-b", json={"autostart": flipped}).status_code == 200
    after = check()
    assert after["lst-b"]["autostart"] is flipped
    assert after["lst-a"] == first["lst-a"]
    assert admin.delete("/v1/instances/lst-a").status_code == 200
    assert "lst-a" not in check()
    for n in ("lst-b", "lst-c"):
        admin.delete(f"/v1/instances/{n}")
    assert not {"lst-b", "lst-c"} & set(check())
