"""Bearer tokens with roles.

A token is ``na_<id>_<secret>``: the id is public (it names the row), the secret is
32 random bytes kept only as its sha256 (a high-entropy secret needs no slow hash)
and compared with ``hmac.compare_digest``. Roles: ``admin`` may do everything,
``reader`` may only read (GET/HEAD); ``/metrics`` accepts either role. ``peer`` is
another host's: it reaches the peer routes (``/v1/peer/...``, auth "peer") and nothing
else, so a host that is taken over gets no more of its peers than migrations give.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from agent import schema
from agent.errors import Conflict, Forbidden, InvalidInput, Unauthorized
from agent.state import Database

ROLES = ("admin", "reader", "peer")
TOKEN_PREFIX = "na_"
TOKEN_ID_BYTES = 6  # 12 hex chars: enough to name a row, not a secret
TOKEN_SECRET_BYTES = 32  # 256 bits: brute force is out of reach, so sha256 suffices
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN_RE = re.compile(r"^na_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    """The token table. ``create`` returns the only copy of the secret token."""

    def __init__(self, db: Database):
        self.db = db
        schema.apply(db)

    def create(self, name: str, role: str) -> str:
        if not NAME_RE.match(name or ""):
            raise InvalidInput(f"token name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
        if role not in ROLES:
            raise InvalidInput(f"role {role!r} is invalid: use admin, reader or peer")
        token_id = secrets.token_hex(TOKEN_ID_BYTES)
        secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM tokens WHERE name=?", (name,)).fetchone():
                raise Conflict(f"a token named {name!r} exists: revoke it first or pick another name")
            c.execute("INSERT INTO tokens(id, name, role, secret_hash, created_at) VALUES(?,?,?,?,?)",
                      (token_id, name, role, _digest(secret), time.time()))
        return f"{TOKEN_PREFIX}{token_id}_{secret}"

    def list(self) -> list[dict]:
        return [{"name": r["name"], "role": r["role"], "id": r["id"], "created_at": r["created_at"],
                 "last_used_at": r["last_used_at"]}
                for r in self.db.query("SELECT * FROM tokens ORDER BY name")]

    def revoke(self, name: str) -> bool:
        """Return False if no token had that name."""
        return self.db.execute("DELETE FROM tokens WHERE name=?", (name,)).rowcount > 0

    def verify(self, token: str) -> dict:
        """Return {"name", "role"} for a valid token; Unauthorized otherwise."""
        m = _TOKEN_RE.match(token or "")
        row = self.db.one("SELECT name, role, secret_hash FROM tokens WHERE id=?", (m.group(1),)) if m else None
        # compare even when the row is missing, so timing does not tell ids apart
        expected = row["secret_hash"] if row else "0" * 64
        presented = _digest(m.group(2)) if m else "1" * 64
        if not (hmac.compare_digest(expected, presented) and row):
            raise Unauthorized("missing or invalid bearer token: send 'Authorization: Bearer <token>' "
                               "with a token from `nodeagent token create`")
        return {"name": row["name"], "role": row["role"]}


def authorize(tokens: Tokens, header: str | None, method: str, route_auth: str = "reader") -> dict:
    """Check an Authorization header for a request of ``method`` on a route whose auth is
    ``route_auth`` (reader | admin | peer); return the caller."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        tokens.verify("")  # same work and same error as a bad token
    caller = tokens.verify(value.strip())
    if caller["role"] == "peer" or route_auth == "peer":
        if caller["role"] not in ("peer", "admin") or (caller["role"] == "peer" and route_auth != "peer"):
            raise Forbidden(f"token {caller['name']!r} has role {caller['role']}: "
                            + ("a peer token reaches only the peer routes (/v1/peer/...)"
                               if caller["role"] == "peer" else "this route is for peer hosts"))
        return caller
    if caller["role"] != "admin" and method not in READ_METHODS:
        raise Forbidden(f"token {caller['name']!r} has role {caller['role']}: this request needs an admin token")
    return caller
