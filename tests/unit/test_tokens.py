"""The token table: roles, and a state DB from before the peer role keeps its tokens."""
import pytest

from agent import schema
from agent.auth import Tokens, _digest, authorize
from agent.errors import Forbidden, InvalidInput
from agent.state import Database


def test_a_db_from_before_the_peer_role_keeps_its_tokens(tmp_path):
    db = Database(tmp_path / "state.db")
    db.apply_schema("agent", schema.SCHEMA_STEPS[:1])  # the table as the first agents made it
    secret = "x" * 43  # a token as the first agents made it, written as they wrote it
    db.execute("INSERT INTO tokens(id, name, role, secret_hash, created_at) VALUES(?,?,?,?,?)",
               ("0123456789ab", "ops", "admin", _digest(secret), 1.0))
    tokens = Tokens(db)  # applies the remaining steps
    assert authorize(tokens, f"Bearer na_0123456789ab_{secret}", "POST")["role"] == "admin"
    assert tokens.get("ops")["expires_at"] is None
    peer = tokens.create("host2", "peer")
    caller = authorize(tokens, f"Bearer {peer}", "POST", "peer")
    assert (caller["name"], caller["role"], caller["via"]) == ("host2", "peer", "token")
    db.close()


@pytest.mark.parametrize("route_auth,method", [("reader", "GET"), ("admin", "POST"), ("reader", "HEAD")])
def test_a_peer_token_is_refused_outside_the_peer_routes(db, route_auth, method):
    tokens = Tokens(db)
    peer = tokens.create("host2", "peer")
    with pytest.raises(Forbidden, match="peer routes"):
        authorize(tokens, f"Bearer {peer}", method, route_auth)


def test_readers_are_refused_on_the_peer_routes_and_roles_are_checked(db):
    tokens = Tokens(db)
    reader = tokens.create("watcher", "reader")
    with pytest.raises(Forbidden):
        authorize(tokens, f"Bearer {reader}", "GET", "peer")
    with pytest.raises(InvalidInput):
        tokens.create("x", "root")
