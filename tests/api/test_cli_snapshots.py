"""`nodeagent snapshot create|list|show|restore|delete` and `instance rebuild` against a real
server on the fake drivers."""
import json

import pytest


@pytest.fixture
def cli(agent):
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    return lambda *args, check=True: agent.cli(*args, env=env, check=check)


def test_snapshot_verbs(cli, admin, images):
    try:
        cli("instance", "create", "clisnap", "--kind", "vm", "--image", "tiny-vm", "--memory", "128")
        out = cli("snapshot", "create", "clisnap", "s1").stdout
        assert out.strip() == "snapshot s1 of clisnap taken (crash-consistent)", out
        rows = json.loads(cli("snapshot", "list", "clisnap", "--json").stdout)["snapshots"]
        assert [s["name"] for s in rows] == ["s1"]
        assert "s1" in cli("snapshot", "list", "clisnap").stdout
        assert json.loads(cli("snapshot", "show", "clisnap", "s1", "--json").stdout)["instance"] == "clisnap"
        r = cli("snapshot", "restore", "clisnap", "s1", check=False)
        assert r.returncode == 1 and "stop it first" in r.stderr and "Traceback" not in r.stderr
        cli("instance", "stop", "clisnap")
        assert cli("snapshot", "restore", "clisnap", "s1").stdout.strip() == "clisnap restored to snapshot s1"
        r = cli("snapshot", "create", "clisnap", "bad.name", check=False)
        assert r.returncode == 1 and "name: use 1-63 letters" in r.stderr, r.stderr
        r = cli("snapshot", "show", "clisnap", "nosuch", check=False)
        assert r.returncode == 1 and "no snapshot" in r.stderr
        assert cli("snapshot", "delete", "clisnap", "s1").stdout.strip() == "deleted snapshot s1 of clisnap"
        assert json.loads(cli("snapshot", "list", "clisnap", "--json").stdout) == {"snapshots": []}
        assert cli("instance", "rebuild", "clisnap").stdout.strip() == "clisnap stopped"
        r = cli("instance", "rebuild", "clisnap", "--image", "busybox", check=False)
        assert r.returncode == 1 and "cannot rebuild a vm" in r.stderr
    finally:
        admin.delete("/v1/instances/clisnap")
