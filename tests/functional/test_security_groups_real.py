"""Security groups on real runc containers through a real agent: another tenant's open port
is closed without a rule and open with one (live), members of one group reach each other,
the filter comes back after an agent restart with the host's tables gone (a reboot), and a
deleted instance leaves nothing in them."""
from __future__ import annotations

import secrets
import shutil
import subprocess

import pytest

from containers.network import short_hash
from testbed.agentproc import AgentProcess, Api
from testbed.ocibuild import busybox_layers, write_layout
from testbed import runtimes

pytestmark = pytest.mark.real


@pytest.fixture
def agent(open_tmp):
    tmp_path = open_tmp  # user-namespaced containers' roots reach their rootfs by path
    for tool in ("runc", "conmon", "nft"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    bridge, subnet = runtimes.test_network()
    parent = runtimes.test_cgroup_parent()
    a = AgentProcess(tmp_path / "sg", pool_kind="local")
    runc = f'runtime = "runc"\ncgroup_parent = "{parent}"'
    a.config.write_text(a.config.read_text().replace('runtime = "fake"', runc)
                        + f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\nnat = false\n'
                          'default_policy = "same-group"\n')
    a.admin_token = a.token("admin", "admin")
    a.start()
    a.bridge = bridge
    api = Api(a.url, a.admin_token)
    layout = write_layout(str(tmp_path / "layout"), {"latest": busybox_layers()})
    op = api.wait(api.post("/v1/images", json={"name": "busybox", "format": "oci",
                                               "source": {"type": "file", "path": layout}}).json())
    assert op["status"] == "succeeded", op.get("error") or op
    yield a
    if a.proc is None or a.proc.poll() is not None:
        a.start()
    api = Api(a.url, a.admin_token)
    for inst in api.get("/v1/instances").json()["instances"]:
        api.delete(f"/v1/instances/{inst['id']}")
    a.stop()
    runtimes.drop_test_network(bridge, a.rtag)
    runtimes.drop_cgroup_parent(parent)


def nft_tables(a) -> str:
    out = ""
    for family in ("bridge", "inet"):
        out += subprocess.run(["nft", "list", "table", family, f"nodeagent_{a.rtag}"],
                              capture_output=True, text=True).stdout
    return out


def create(api, name, command, groups=None):
    body = {"name": name, "kind": "container", "image": "busybox", "memory_mib": 64, "command": command}
    if groups:
        body["security_groups"] = groups
    op = api.wait(api.post("/v1/instances", json=body).json(), timeout=120)
    assert op["status"] == "succeeded", op.get("error") or op
    return op["result"]["instance"]


def reaches(api, name, ip, port=7000) -> bool:
    r = api.post(f"/v1/instances/{name}/exec", json={"command": ["busybox", "nc", "-w", "2", ip, str(port)],
                                                     "timeout": 15}).json()
    return r["exit_code"] == 0 and r["stdout"] == "hi\n"


def test_groups_open_and_close_ports_live_and_survive_a_restart(agent):
    api = Api(agent.url, agent.admin_token)
    sfx = secrets.token_hex(3)
    web, client = f"web-{sfx}", f"client-{sfx}"
    for g in (web, client):
        assert api.post("/v1/security-groups", json={"name": g, "rules": []}).status_code == 201
    server = create(api, f"srv-{sfx}", ["busybox", "nc", "-ll", "-p", "7000", "-e", "echo", "hi"], [web])
    create(api, f"peer-{sfx}", ["busybox", "sleep", "600"], [web])
    create(api, f"cli-{sfx}", ["busybox", "sleep", "600"], [client])
    ip = server["ip"]
    # same group: reachable (the allowed case); another group without a rule: not reachable
    assert reaches(api, f"peer-{sfx}", ip)
    assert not reaches(api, f"cli-{sfx}", ip)
    # a rule allowing the client group's members in, live
    rule = {"direction": "ingress", "protocol": "tcp", "port_min": 7000, "remote_group": client}
    assert api.put(f"/v1/security-groups/{web}", json={"rules": [rule]}).status_code == 200
    assert reaches(api, f"cli-{sfx}", ip)
    assert api.put(f"/v1/security-groups/{web}", json={"rules": []}).status_code == 200
    assert not reaches(api, f"cli-{sfx}", ip)
    # moving the client into the server's group, live
    assert api.put(f"/v1/instances/cli-{sfx}/security-groups", json={"security_groups": [client, web]}).ok
    assert reaches(api, f"cli-{sfx}", ip)
    assert api.put(f"/v1/instances/cli-{sfx}/security-groups", json={"security_groups": [client]}).ok
    assert not reaches(api, f"cli-{sfx}", ip)

    # an agent restart after a host reboot (its tables gone): rebuilt from the state DB
    agent.stop()  # the test harness drops the agent's tables when it stops, as a reboot would
    assert nft_tables(agent) == ""
    agent.start()
    listing = nft_tables(agent)
    veth = "nv" + agent.rtag + short_hash(f"srv-{sfx}", 8)
    assert f'"{veth}" . {ip}' in listing and f"{ip} : jump in_" in listing
    assert reaches(api, f"peer-{sfx}", ip)
    assert not reaches(api, f"cli-{sfx}", ip)

    # delete: nothing of the instance is left in the tables
    assert api.delete(f"/v1/instances/srv-{sfx}").status_code == 200
    listing = nft_tables(agent)
    assert veth not in listing and f"{ip} " not in listing and f"{ip}," not in listing
    assert "127.0.0.0/8" in listing  # host protection stays
