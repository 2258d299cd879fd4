"""The nodeagent CLI against a real server (URL and token from the environment)."""
import json

import pytest


@pytest.fixture
def cli(agent):
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    return lambda *args, check=True: agent.cli(*args, env=env, check=check)


def test_host_and_lists_as_json(cli, images):
    assert json.loads(cli("host", "--json").stdout)["hypervisor_driver"] == "fake"
    names = {i["name"] for i in json.loads(cli("image", "list", "--json").stdout)["images"]}
    assert {"busybox", "tiny-vm"} <= names
    assert "busybox" in cli("image", "list").stdout  # the rich table


def test_image_import_and_rm(cli, tmp_path, images):
    import subprocess
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    out = cli("image", "import", str(disk), "--name", "cli-disk")
    assert "imported cli-disk" in out.stdout
    disk2 = tmp_path / "d2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk2), "17M"], check=True)
    op = json.loads(cli("image", "import", str(disk2), "--name", "cli-disk2", "--json").stdout)
    assert op["status"] == "succeeded" and op["result"]["image"]["name"] == "cli-disk2"
    cli("image", "rm", "cli-disk")
    cli("image", "rm", "cli-disk2")
    r = cli("image", "rm", "cli-disk", check=False)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_instance_verbs(cli, images):
    out = cli("instance", "create", "clibox", "--kind", "container", "--image", "busybox", "--memory", "64",
              "--env", "A=1", "--", "/bin/sh", "-c", "sleep 100")
    assert "clibox" in out.stdout and "running" in out.stdout
    listed = json.loads(cli("instance", "list", "--json").stdout)["instances"]
    assert [i["name"] for i in listed] == ["clibox"]
    assert json.loads(cli("instance", "show", "clibox", "--json").stdout)["state"] == "running"
    ex = cli("instance", "exec", "clibox", "echo", "hi", check=False)
    assert ex.returncode == 0 and "hi" in ex.stdout
    assert "logs" in json.loads(cli("instance", "logs", "clibox", "--json").stdout)
    assert "stopped" in cli("instance", "stop", "clibox", "--timeout", "5").stdout
    assert "running" in cli("instance", "start", "clibox").stdout
    r = cli("migrate", "clibox", "--to", "elsewhere", check=False)
    assert r.returncode == 1 and "not a configured peer" in r.stderr
    cli("instance", "rm", "clibox")
    assert json.loads(cli("instance", "list", "--json").stdout)["instances"] == []


def test_cli_errors_are_clear(agent):
    r = agent.cli("host", env={"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": "na_bad"}, check=False)
    assert r.returncode == 1 and "bearer token" in r.stderr
    r = agent.cli("host", env={"NODEAGENT_URL": "http://127.0.0.1:9", "NODEAGENT_TOKEN": "x"}, check=False)
    assert r.returncode == 1 and "cannot reach the agent" in r.stderr


def test_image_import_shows_a_progress_bar_on_a_terminal(agent, tmp_path, images):
    """Under a pseudo-terminal (util-linux `script`) the import draws a rich bar fed by the operation."""
    import os
    import shutil
    import subprocess
    assert shutil.which("script"), "util-linux `script` is missing"
    disk = tmp_path / "bar.raw"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    env = {**agent.env, "NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token, "COLUMNS": "100"}
    cmd = f"{os.sys.executable} -m agent image import {disk} --name bar --format raw"
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=str(agent.config.parent), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "importing bar" in r.stdout and "/8.4 MB" in r.stdout and "imported bar" in r.stdout
    agent.cli("image", "rm", "bar", env={"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token})


def test_events_replay_what_came_after_an_id(cli, images):
    cli("instance", "create", "evbox", "--kind", "container", "--image", "busybox", "--memory", "64",
        "--", "/bin/sh", "-c", "sleep 100")
    first = [json.loads(x) for x in cli("events", "--type", "lifecycle", "--last-event-id", "0",
                                        "--timeout", "1").stdout.splitlines()]
    assert any(e["data"].get("name") == "evbox" for e in first), first
    cli("instance", "rm", "evbox")
    later = [json.loads(x) for x in cli("events", "--type", "lifecycle", "--last-event-id", str(first[-1]["id"]),
                                        "--timeout", "1").stdout.splitlines()]
    assert later and all(e["id"] > first[-1]["id"] for e in later)
    assert any(e["data"].get("name") == "evbox" and e["data"].get("state") == "deleted" for e in later), later
    r = cli("events", "--last-event-id", "x", check=False)
    assert r.returncode == 2


def test_a_privileged_container_from_the_cli_needs_an_admin_token(agent, cli, images):
    args = ("instance", "create", "privbox", "--kind", "container", "--image", "busybox", "--memory", "64",
            "--privileged", "--", "/bin/sh", "-c", "sleep 100")
    r = agent.cli(*args, env={"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.reader_token}, check=False)
    assert r.returncode == 1 and "admin token" in r.stderr and "Traceback" not in r.stderr
    assert "running" in cli(*args).stdout
    cli("instance", "rm", "privbox")


def test_secgroup_verbs(cli, images):
    out = cli("secgroup", "create", "cli-web", "--rule", "ingress:tcp:80-81:10.0.0.0/8", "--rule", "egress:udp:53")
    assert "cli-web: 2 rules" in out.stdout
    shown = json.loads(cli("secgroup", "show", "cli-web", "--json").stdout)
    assert shown["rules"][0] == {"direction": "ingress", "protocol": "tcp", "port_min": 80, "port_max": 81,
                                 "remote_cidr": "10.0.0.0/8"}
    cli("secgroup", "set", "cli-web", "--rule", "ingress:any::@cli-web")
    assert "ingress any @cli-web" in cli("secgroup", "show", "cli-web").stdout
    assert "cli-web" in cli("secgroup", "list").stdout
    r = cli("secgroup", "create", "cli-bad", "--rule", "sideways", check=False)
    assert r.returncode == 2 and "DIRECTION" in r.stderr
    cli("instance", "create", "sgbox", "--kind", "container", "--image", "busybox", "--memory", "64",
        "--security-group", "cli-web", "--", "/bin/sh", "-c", "sleep 100")
    assert cli("instance", "security-groups", "sgbox").stdout.split() == ["cli-web"]
    r = cli("secgroup", "delete", "cli-web", check=False)
    assert r.returncode == 1 and "used by sgbox" in r.stderr
    assert cli("instance", "security-groups", "sgbox", "default").stdout.split() == ["default"]
    cli("secgroup", "delete", "cli-web")
    cli("instance", "rm", "sgbox")
