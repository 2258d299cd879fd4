"""Bearer tokens with roles, and client-certificate identities.

A token is ``na_<id>_<secret>``: the id is public (it names the row), the secret is
32 random bytes kept only as its sha256 (a high-entropy secret needs no slow hash)
and compared with ``hmac.compare_digest``. Roles: ``admin`` may do everything,
``reader`` may only read (GET/HEAD); ``/metrics`` accepts either role. ``peer`` is
another host's: it reaches the peer routes (``/v1/peer/...``, auth "peer") and nothing
else, so a host that is taken over gets no more of its peers than migrations give.
A token may expire (``expires_at``, unix seconds): from then on it is refused (401 naming
the expiry). Its last use is kept in memory at every request and written to the state DB
at most once per LAST_USED_WRITE_INTERVAL, not on every request.

With ``[api] client_ca`` a client presents a certificate; a request without a bearer token
is then the certificate's identity: the first of its subject CN and its SAN DNS names that
``[api] cert_roles`` maps to a role (``{name: <that identity>, role, via: "certificate"}``).
A bearer token, when sent, wins over the certificate.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time

from agent import schema
from agent.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from agent.state import Database

ROLES = ("admin", "reader", "peer")
TOKEN_PREFIX = "na_"
TOKEN_ID_BYTES = 6  # 12 hex chars: enough to name a row, not a secret
TOKEN_SECRET_BYTES = 32  # 256 bits: brute force is out of reach, so sha256 suffices
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
_TOKEN_RE = re.compile(r"^na_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LAST_USED_WRITE_INTERVAL = 60  # seconds: a token's last use reaches the state DB at most this often
MAX_TOKEN_LIFETIME = 10 * 365 * 86400  # seconds (10 years): a longer expiry is a typo


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Tokens:
    """The token table (its only reader and writer). ``create`` returns the only copy of the
    secret token."""

    def __init__(self, db: Database):
        self.db = db
        schema.apply(db)
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}  # token id -> last use (every request)
        self._written: dict[str, float] = {}  # token id -> last use written to the DB

    def create(self, name: str, role: str, expires_at: float | None = None, ttl_s: float | None = None) -> str:
        """``expires_at`` (unix seconds) or ``ttl_s`` (seconds from now): when it stops working;
        neither: never."""
        if not NAME_RE.match(name or ""):
            raise InvalidInput(f"token name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
        if role not in ROLES:
            raise InvalidInput(f"role {role!r} is invalid: use admin, reader or peer")
        now = time.time()
        if ttl_s is not None:
            expires_at = now + ttl_s
        if expires_at is not None and not now < expires_at <= now + MAX_TOKEN_LIFETIME:
            raise InvalidInput(f"expires_at {expires_at!r} must lie in the future, at most 10 years "
                               "from now (unix seconds)")
        token_id = secrets.token_hex(TOKEN_ID_BYTES)
        secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM tokens WHERE name=?", (name,)).fetchone():
                raise Conflict(f"a token named {name!r} exists: revoke it first or pick another name")
            c.execute("INSERT INTO tokens(id, name, role, secret_hash, created_at, expires_at) "
                      "VALUES(?,?,?,?,?,?)", (token_id, name, role, _digest(secret), now, expires_at))
        return f"{TOKEN_PREFIX}{token_id}_{secret}"

    def _info(self, r) -> dict:
        with self._lock:
            seen = self._used.get(r["id"])
        last = max(filter(None, (r["last_used_at"], seen)), default=None)
        return {"name": r["name"], "role": r["role"], "id": r["id"], "created_at": r["created_at"],
                "expires_at": r["expires_at"], "last_used_at": last,
                "expired": r["expires_at"] is not None and r["expires_at"] <= time.time()}

    def list(self) -> list[dict]:
        """Every token, never its secret (only its sha256 is kept)."""
        return [self._info(r) for r in self.db.query("SELECT * FROM tokens ORDER BY name")]

    def get(self, name: str) -> dict:
        r = self.db.one("SELECT * FROM tokens WHERE name=?", (name,))
        if r is None:
            raise NotFound(f"token {name!r} not found")
        return self._info(r)

    def revoke(self, name: str) -> bool:
        """Return False if no token had that name."""
        return self.db.execute("DELETE FROM tokens WHERE name=?", (name,)).rowcount > 0

    def verify(self, token: str) -> dict:
        """Return {"name", "role", "id", "via"} for a valid, unexpired token; Unauthorized otherwise."""
        m = _TOKEN_RE.match(token or "")
        row = self.db.one("SELECT id, name, role, secret_hash, expires_at FROM tokens WHERE id=?",
                          (m.group(1),)) if m else None
        # compare even when the row is missing, so timing does not tell ids apart
        expected = row["secret_hash"] if row else "0" * 64
        presented = _digest(m.group(2)) if m else "1" * 64
        if not (hmac.compare_digest(expected, presented) and row):
            raise Unauthorized("missing or invalid bearer token: send 'Authorization: Bearer <token>' "
                               "with a token from `nodeagent token create`")
        now = time.time()
        if row["expires_at"] is not None and row["expires_at"] <= now:
            raise Unauthorized(f"token {row['name']!r} expired at {_iso(row['expires_at'])}: ask an admin "
                               "for a new one (`nodeagent token create`, POST /v1/tokens)")
        self._record_use(row["id"], now)
        return {"name": row["name"], "role": row["role"], "id": row["id"], "via": "token"}

    def _record_use(self, token_id: str, now: float) -> None:
        with self._lock:
            self._used[token_id] = now
            if now - self._written.get(token_id, 0.0) < LAST_USED_WRITE_INTERVAL:
                return
            self._written[token_id] = now
        self.db.execute("UPDATE tokens SET last_used_at=? WHERE id=?", (now, token_id))


def cert_caller(cert: dict | None, cert_roles: dict[str, str] | None) -> dict | None:
    """The caller a client certificate ({"cn": ..., "dns": [...]}, as the server read it)
    stands for: the first of its CN and SAN DNS names that ``cert_roles`` maps; else None."""
    if not cert or not cert_roles:
        return None
    for ident in [cert.get("cn"), *(cert.get("dns") or ())]:
        if ident and ident in cert_roles:
            return {"name": ident, "role": cert_roles[ident], "via": "certificate"}
    return None


def authorize(tokens: Tokens, header: str | None, method: str, route_auth: str = "reader", *,
              cert: dict | None = None, cert_roles: dict[str, str] | None = None) -> dict:
    """Check an Authorization header (or, without one, the client certificate) for a request
    of ``method`` on a route whose auth is ``route_auth`` (reader | admin | peer); return the
    caller."""
    caller = cert_caller(cert, cert_roles) if not header else None
    if caller is None:
        if not header and cert:
            who = ", ".join(filter(None, [cert.get("cn"), *(cert.get("dns") or ())])) or "no name"
            try:
                tokens.verify("")  # same work as a bad token
            except Unauthorized:
                pass
            raise Unauthorized(f"no bearer token, and the client certificate ({who}) is not in [api] "
                               "cert_roles: send 'Authorization: Bearer <token>' or map the certificate "
                               "to a role")
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            tokens.verify("")  # same work and same error as a bad token
        caller = tokens.verify(value.strip())
    if caller["role"] == "peer" or route_auth == "peer":
        if caller["role"] not in ("peer", "admin") or (caller["role"] == "peer" and route_auth != "peer"):
            raise Forbidden(f"{_who(caller)} has role {caller['role']}: "
                            + ("a peer token reaches only the peer routes (/v1/peer/...)"
                               if caller["role"] == "peer" else "this route is for peer hosts"))
        return caller
    if caller["role"] != "admin" and (method not in READ_METHODS or route_auth == "admin"):
        raise Forbidden(f"{_who(caller)} has role {caller['role']}: this request needs an admin token")
    return caller


def _who(caller: dict) -> str:
    return (f"certificate {caller['name']!r}" if caller.get("via") == "certificate"
            else f"token {caller['name']!r}")
