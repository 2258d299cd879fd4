"""Bandwidth limits through the API: set at create, validated, changed live with PATCH
(admin only, an event, kept in the record), on the fakes in-process and on a real agent
with runc (tc on the container's veth, re-applied after a crash), and by the CLI."""
from __future__ import annotations

import json
import secrets
import shutil

import pytest

from tests.api.conftest import assert_error, inprocess_app

BUSY = {"kind": "container", "image": "busybox", "memory_mib": 64, "command": ["/bin/sh", "-c", "sleep 600"]}


def _create(api, **body):
    r = api.post("/v1/instances", json=body)
    assert r.status_code == 202, r.text
    return api.wait(r.json())


@pytest.mark.parametrize("body, field", [
    ({"bandwidth": {"ingress_kbit": 10}}, "bandwidth.ingress_kbit"),  # below 64
    ({"bandwidth": {"egress_kbit": 10**12}}, "bandwidth.egress_kbit"),
    ({"bandwidth": {"egress_kbit": "8000"}}, "bandwidth.egress_kbit"),  # strict: no strings
    ({"bandwidth": {"egress_kbit": 1000, "burst_kbit": 5 * 10**6}}, "bandwidth.burst_kbit"),
    ({"bandwidth": {"egress_kbit": None, "burst_kbit": 1000}}, "goes with"),
    ({"bandwidth": {"burst_kbit": 1000}}, "goes with"),
    ({"bandwidth": {"ingress_kbit": 1000, "extra": 1}}, "bandwidth.extra"),
    ({"network": "none", "bandwidth": {"ingress_kbit": 1000}}, "bridge port"),
    ({"network": "host", "bandwidth": {"ingress_kbit": 1000}}, "bridge port"),
])
def test_bad_bandwidth_at_create_is_422_and_leaves_nothing(admin, images, body, field):
    r = admin.post("/v1/instances", json={**BUSY, "name": f"bw-{secrets.token_hex(3)}", **body})
    err = assert_error(r, 422)
    assert field in err["message"], err
    assert not [i for i in admin.get("/v1/instances").json()["instances"] if i["name"].startswith("bw-")]


def test_create_then_patch_live_admin_only(admin, reader, images):
    op = _create(admin, **BUSY, name="bwc", bandwidth={"ingress_kbit": 8000, "egress_kbit": 4000})
    assert op["status"] == "succeeded", op
    inst = op["result"]["instance"]
    assert inst["bandwidth"] == {"ingress_kbit": 8000, "egress_kbit": 4000, "burst_kbit": None}
    assert_error(reader.patch("/v1/instances/bwc", json={"bandwidth": {"ingress_kbit": 100}}), 403)
    assert_error(admin.patch("/v1/instances/bwc", json={}), 422)  # nothing to change
    assert_error(admin.patch("/v1/instances/bwc", json={"max_cpus": 2}), 422)  # not changeable
    assert_error(admin.patch("/v1/instances/bwc", json={"bandwidth": {"ingress_kbit": 1}}), 422)
    assert_error(admin.patch("/v1/instances/nosuch", json={"bandwidth": None}), 404)
    r = admin.patch("/v1/instances/bwc", json={"bandwidth": {"egress_kbit": 2000, "burst_kbit": 500}})
    assert r.status_code == 200, r.text
    assert r.json()["bandwidth"] == {"ingress_kbit": None, "egress_kbit": 2000, "burst_kbit": 500}
    assert reader.get("/v1/instances/bwc").json()["bandwidth"]["egress_kbit"] == 2000
    r = admin.patch("/v1/instances/bwc", json={"bandwidth": None})  # every limit removed
    assert r.status_code == 200 and r.json()["bandwidth"] is None, r.text
    assert admin.delete("/v1/instances/bwc").status_code == 200


def test_vm_bandwidth_and_the_event_of_a_change(tmp_path):
    app, client, root = inprocess_app(tmp_path)
    try:
        with root.events.subscribe({"lifecycle"}) as sub:
            op = client.post("/v1/instances", json={"name": "bwvm", "kind": "vm", "image": "tiny-vm",
                                                     "memory_mib": 128, "bandwidth": {"ingress_kbit": 1000}}).json
            op = client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json
            assert op["status"] == "succeeded", op
            assert root.driver.bandwidth("bwvm").ingress_kbit == 1000  # handed to the driver's spec
            r = client.patch("/v1/instances/bwvm", json={"bandwidth": {"egress_kbit": 640}})
            assert r.status_code == 200, r.json
            assert root.driver.bandwidth("bwvm").to_dict() == {"ingress_kbit": None, "egress_kbit": 640,
                                                                "burst_kbit": None}
            events = []
            while (e := sub.get(1)) is not None:
                events.append(e["data"])
            assert {"instance": op["result"]["instance"]["id"], "name": "bwvm", "state": "running",
                    "changed": ["bandwidth"]} in events, events
        r = client.post("/v1/instances", json={"name": "bwvm2", "kind": "vm", "image": "tiny-vm", "memory_mib": 128,
                                               "network": "none", "bandwidth": {"ingress_kbit": 1000}})
        assert r.status_code == 422 and "bridge port" in r.json["error"]["message"]
        # a migration's destination gets the spec: the peer model carries bandwidth too
        from agent import models
        assert models.InstanceSpec.model_validate(
            {**root.records.find("bwvm").spec_dict(), "bandwidth": {"egress_kbit": 640}}).bandwidth.egress_kbit == 640
    finally:
        root.stop()


@pytest.mark.real
def test_real_runc_agent_applies_keeps_and_reapplies_limits(open_tmp):
    tmp_path = open_tmp  # user-namespaced containers' roots reach their rootfs by path
    for tool in ("runc", "conmon", "tc"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from containers import bandwidth
    from containers.network import short_hash
    from testbed.agentproc import AgentProcess, Api
    from testbed.runtimes import drop_test_network, test_network
    from tests.api.test_crash import _import_busybox
    bridge, subnet = test_network()
    agent = AgentProcess(tmp_path / "r", pool_kind="local", runtime="runc", network=(bridge, subnet))
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    name = f"bw-{secrets.token_hex(3)}"  # runc cgroups are host-wide: unique per run
    rtag = short_hash(str((tmp_path / "r" / "containers").resolve()), 4)
    veth = f"nv{rtag}{short_hash(name, 8)}"
    try:
        _import_busybox(api, tmp_path)
        out = agent.cli("instance", "create", name, "--kind", "container", "--image", "busybox", "--memory", "64",
                        "--ingress-kbit", "8000", "--egress-kbit", "4000", "--", "/bin/sh", "-c", "sleep 600",
                        env=env)
        assert "running" in out.stdout, out
        assert bandwidth.read(veth) == {"ingress_kbit": 8000, "egress_kbit": 4000}
        out = agent.cli("instance", "set-bandwidth", name, "--egress-kbit", "1000", env=env)
        assert "ingress unlimited egress 1000" in out.stdout, out
        assert bandwidth.read(veth) == {"ingress_kbit": None, "egress_kbit": 1000}
        bad = agent.cli("instance", "set-bandwidth", name, env=env, check=False)
        assert bad.returncode != 0 and "--unlimited" in bad.stderr
        bad = agent.cli("instance", "set-bandwidth", name, "--egress-kbit", "1", env=env, check=False)
        assert bad.returncode != 0 and "egress_kbit" in bad.stderr and "Traceback" not in bad.stderr
        # a crash, and the limits lost meanwhile (drift): the restarted agent puts them back
        agent.kill9()
        bandwidth.clear(veth)
        agent.start()
        assert api.get(f"/v1/instances/{name}").json()["state"] == "running"
        assert bandwidth.read(veth) == {"ingress_kbit": None, "egress_kbit": 1000}
        # a restart of the container keeps them (same veth); the record says what they are
        done = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "restart", "timeout": 2}).json())
        assert done["status"] == "succeeded", done
        assert bandwidth.read(veth)["egress_kbit"] == 1000
        assert json.loads(agent.cli("instance", "show", name, "--json", env=env).stdout)["bandwidth"]["egress_kbit"] \
            == 1000
        agent.cli("instance", "set-bandwidth", name, "--unlimited", env=env)
        assert bandwidth.read(veth) == {"ingress_kbit": None, "egress_kbit": None}
        assert api.delete(f"/v1/instances/{name}").status_code == 200
        assert not bandwidth.port_exists(bandwidth.ifb_name(veth))
    finally:
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()
        Api(agent.url, agent.admin_token).delete(f"/v1/instances/{name}")
        assert agent.stop() == 0
        drop_test_network(bridge, agent.rtag)
