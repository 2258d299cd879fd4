"""The token table: roles, and a state DB from before the peer role keeps its tokens."""
import pytest

from agent import schema
from agent.auth import Tokens, authorize
from agent.errors import Forbidden, InvalidInput
from agent.state import Database


def test_a_db_from_before_the_peer_role_keeps_its_tokens(tmp_path):
    db = Database(tmp_path / "state.db")
    db.apply_schema("agent", schema.SCHEMA_STEPS[:1])  # the table as the first agents made it
    old = Tokens.__new__(Tokens)
    old.db = db
    secret = old.create("ops", "admin")
    tokens = Tokens(db)  # applies the remaining steps
    assert authorize(tokens, f"Bearer {secret}", "POST")["role"] == "admin"
    peer = tokens.create("host2", "peer")
    assert authorize(tokens, f"Bearer {peer}", "POST", "peer") == {"name": "host2", "role": "peer"}
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
