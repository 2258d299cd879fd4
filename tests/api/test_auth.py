"""Tokens and roles through a real server, and the token CLI."""
import json

from tests.api.conftest import assert_error


def test_health_needs_no_token(anon):
    assert anon.get("/v1/health").json() == {"status": "ok"}


def test_missing_and_bad_tokens_get_401(anon, agent):
    assert_error(anon.get("/v1/instances"), 401, "unauthorized")
    for header in ("Bearer nope", "Basic " + agent.admin_token, "Bearer " + agent.admin_token[:-2] + "xx",
                   agent.admin_token):
        assert_error(anon.get("/v1/instances", headers={"Authorization": header}), 401)


def test_reader_reads_but_gets_403_on_writes(reader):
    assert reader.get("/v1/instances").status_code == 200
    assert reader.get("/v1/host").status_code == 200
    assert_error(reader.post("/v1/instances", json={"name": "x", "kind": "container", "image": "i"}), 403,
                 "forbidden")
    assert_error(reader.delete("/v1/images/abc"), 403)
    assert_error(reader.delete("/v1/operations/abc"), 403)


def test_token_cli_create_list_revoke(agent, anon):
    secret = agent.cli("token", "create", "ci-bot", "--role", "reader").stdout
    assert secret.count("\n") == 1 and secret.startswith("na_")  # ONLY the secret
    secret = secret.strip()
    listed = json.loads(agent.cli("token", "list", "--json").stdout)
    row = next(t for t in listed if t["name"] == "ci-bot")
    assert row["role"] == "reader" and secret not in json.dumps(listed)
    assert anon.get("/v1/host", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert agent.cli("token", "revoke", "ci-bot").returncode == 0
    assert agent.cli("token", "revoke", "ci-bot").returncode == 0  # already gone: still exit 0
    assert_error(anon.get("/v1/host", headers={"Authorization": f"Bearer {secret}"}), 401)


def test_token_cli_rejects_bad_role_and_duplicate(agent):
    r = agent.cli("token", "create", "x", "--role", "root", check=False)
    assert r.returncode != 0 and r.stdout == ""
    agent.cli("token", "create", "dup", "--role", "admin")
    r = agent.cli("token", "create", "dup", "--role", "admin", check=False)
    assert r.returncode != 0 and "exists" in r.stderr
    agent.cli("token", "revoke", "dup")


def test_secrets_are_stored_hashed(agent):
    import sqlite3
    con = sqlite3.connect(agent.state_dir / "state.db")
    dump = "\n".join(con.iterdump())
    con.close()
    assert agent.admin_token not in dump and agent.admin_token.split("_", 2)[2] not in dump
