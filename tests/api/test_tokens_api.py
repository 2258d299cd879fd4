"""Tokens through the API (admin only): create with an optional expiry, list without secrets,
show, revoke; expired tokens refused; the CLI's --remote mode."""
from __future__ import annotations

import json
import time

from agent.auth import LAST_USED_WRITE_INTERVAL, Tokens
from testbed.agentproc import Api
from tests.api.conftest import assert_error


def test_an_admin_creates_lists_and_revokes_tokens(agent, admin, reader, anon):
    r = admin.post("/v1/tokens", json={"name": "api-reader-1", "role": "reader", "ttl_s": 3600})
    assert r.status_code == 201, r.text
    made = r.json()
    secret = made["token"]
    assert made["name"] == "api-reader-1" and made["role"] == "reader" and secret.startswith("na_")
    assert 3600 <= made["expires_at"] - made["created_at"] < 3660
    new = Api(agent.url, secret)
    assert new.get("/v1/host").status_code == 200
    assert_error(new.post("/v1/tokens", json={"name": "x", "role": "admin"}), 403)  # a reader: no
    listed = admin.get("/v1/tokens")
    assert listed.status_code == 200 and secret not in listed.text and secret.split("_", 2)[2] not in listed.text
    mine = {t["name"]: t for t in listed.json()["tokens"]}["api-reader-1"]
    assert set(mine) == {"name", "role", "id", "created_at", "expires_at", "last_used_at", "expired"}
    assert mine["last_used_at"] >= mine["created_at"] and mine["expired"] is False
    one = admin.get("/v1/tokens/api-reader-1").json()
    assert one["id"] == made["id"] and "token" not in one
    # admin only, even to read; nobody without a token
    assert_error(reader.get("/v1/tokens"), 403)
    assert_error(reader.get("/v1/tokens/api-reader-1"), 403)
    assert_error(anon.get("/v1/tokens"), 401)
    # bad requests leave nothing behind
    assert_error(admin.post("/v1/tokens", json={"name": "api-reader-1", "role": "reader"}), 409)
    for bad in ({"name": "x", "role": "root"}, {"name": "../x", "role": "reader"},
                {"name": "x", "role": "reader", "expires_at": time.time() + 3600},  # relative only: ttl_s
                {"name": "x", "role": "reader", "ttl_s": 1}, {"name": "x", "role": "reader", "ttl_s": "60"},
                {"name": "x", "role": "reader", "ttl_s": 11 * 365 * 86400}):
        assert_error(admin.post("/v1/tokens", json=bad), 422)
    assert "x" not in {t["name"] for t in admin.get("/v1/tokens").json()["tokens"]}
    # revoke: the token stops working at once
    assert admin.delete("/v1/tokens/api-reader-1").json() == {"deleted": True}
    assert_error(new.get("/v1/host"), 401)
    assert_error(admin.delete("/v1/tokens/api-reader-1"), 404)
    assert_error(admin.get("/v1/tokens/api-reader-1"), 404)


def test_a_token_cannot_revoke_itself_and_expired_tokens_are_refused(agent, admin):
    second = admin.post("/v1/tokens", json={"name": "api-admin-2", "role": "admin"}).json()["token"]
    other = Api(agent.url, second)
    err = assert_error(other.delete("/v1/tokens/api-admin-2"), 409)
    assert "this request uses" in err["message"]
    assert admin.delete("/v1/tokens/api-admin-2").status_code == 200  # another admin may
    # the shortest expiry the API grants is a minute: an expiring token is made on the host
    api = Api(agent.url, _expiring_token(agent, "api-short"))
    deadline = time.monotonic() + 15
    while api.get("/v1/host").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    err = assert_error(api.get("/v1/host"), 401)
    assert "api-short" in err["message"] and "expired at" in err["message"]
    assert admin.get("/v1/tokens/api-short").json()["expired"] is True
    admin.delete("/v1/tokens/api-short")


def _expiring_token(agent, name: str) -> str:
    """A token that expires in a second, written to the agent's state DB as the host CLI does."""
    from agent.state import Database
    db = Database(agent.state_dir / "state.db")
    try:
        return Tokens(db).create(name, "reader", expires_at=time.time() + 1)
    finally:
        db.close()


def test_the_cli_manages_tokens_through_the_api(agent):
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    out = agent.cli("token", "create", "cli-remote", "--role", "peer", "--expires-at", str(time.time() + 600),
                    "--remote", env=env)
    secret = out.stdout.strip()
    assert secret.startswith("na_")
    listed = agent.cli("token", "list", "--json", "--remote", env=env).stdout
    assert "cli-remote" in listed and secret not in listed
    (row,) = [t for t in json.loads(listed) if t["name"] == "cli-remote"]
    assert 500 < row["expires_at"] - time.time() <= 600
    out = agent.cli("token", "revoke", "cli-remote", "--remote", env=env)
    assert "revoked cli-remote" in out.stderr
    out = agent.cli("token", "revoke", "cli-remote", "--remote", env=env)
    assert "nothing to do" in out.stderr
    out = agent.cli("token", "list", "--remote", env={**env, "NODEAGENT_TOKEN": agent.reader_token}, check=False)
    assert out.returncode != 0 and "403" in out.stderr
    # on the host, without the API, the same verbs keep working
    local = agent.cli("token", "create", "cli-local", "--role", "reader", "--ttl", "600").stdout.strip()
    assert Api(agent.url, local).get("/v1/host").status_code == 200
    assert "cli-local" in agent.cli("token", "list").stdout
    agent.cli("token", "revoke", "cli-local")


def test_openapi_lists_the_token_routes(reader):
    paths = reader.get("/v1/openapi.json").json()["paths"]
    assert {"post", "get"} <= set(paths["/v1/tokens"]) and {"get", "delete"} <= set(paths["/v1/tokens/{name}"])


def test_last_use_is_written_at_most_once_a_minute(db):
    """Every request updates the last use in memory; the state DB gets it once per interval."""
    tokens = Tokens(db)
    secret = tokens.create("busy", "reader")
    tokens.verify(secret)
    first = db.one("SELECT last_used_at FROM tokens WHERE name='busy'")["last_used_at"]
    time.sleep(0.01)
    for _ in range(50):
        tokens.verify(secret)
    assert db.one("SELECT last_used_at FROM tokens WHERE name='busy'")["last_used_at"] == first
    assert tokens.get("busy")["last_used_at"] > first  # what the API shows is current
    tokens._written[tokens.get("busy")["id"]] -= LAST_USED_WRITE_INTERVAL  # a minute later
    tokens.verify(secret)
    assert db.one("SELECT last_used_at FROM tokens WHERE name='busy'")["last_used_at"] > first
