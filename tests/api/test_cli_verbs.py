"""The CLI's instance verbs beyond start/stop (restart, pause, resume, kill, stats, set),
operations (list, show, wait, cancel) and migration show, against a real server on the
fake drivers."""
import json

import pytest


@pytest.fixture
def cli(agent):
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    return lambda *args, check=True: agent.cli(*args, env=env, check=check)


def test_lifecycle_stats_and_set(cli, admin, images):
    try:
        out = cli("instance", "create", "cliverbs", "--kind", "vm", "--image", "tiny-vm", "--memory", "128",
                  "--max-cpus", "2", "--max-memory", "256", "--no-autostart")
        assert "running" in out.stdout, out
        assert "paused" in cli("instance", "pause", "cliverbs").stdout
        assert "running" in cli("instance", "resume", "cliverbs").stdout
        assert "running" in cli("instance", "restart", "cliverbs").stdout
        st = json.loads(cli("instance", "stats", "cliverbs", "--json").stdout)
        assert st["cpu_ns"] is not None and "net" in st
        out = cli("instance", "set", "cliverbs", "--cpus", "2", "--memory", "192", "--autostart").stdout
        assert out.strip() == "cliverbs cpus 2 memory 192 MiB (max 2 cpus, 256 MiB) autostart on", out
        r = cli("instance", "set", "cliverbs", "--cpus", "3", check=False)
        assert r.returncode == 1 and "at most 2 vCPUs" in r.stderr and "Traceback" not in r.stderr
        r = cli("instance", "set", "cliverbs", check=False)
        assert r.returncode == 2 and "--cpus" in r.stderr
        assert "stopped" in cli("instance", "kill", "cliverbs").stdout
        ops = json.loads(cli("operation", "list", "--json").stdout)["operations"]
        kill = next(o for o in ops if o["kind"] == "instance.kill")
        assert json.loads(cli("operation", "show", kill["id"], "--json").stdout)["status"] == "succeeded"
        assert f"{kill['id']} succeeded" in cli("operations", "wait", kill["id"]).stdout  # the plural works too
        r = cli("operation", "cancel", kill["id"], check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr  # it has ended: 409
        r = cli("migration", "show", "nosuch", check=False)
        assert r.returncode == 1 and "not found" in r.stderr
    finally:
        admin.delete("/v1/instances/cliverbs")
