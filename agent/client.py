"""A small HTTP client for the agent's API (used by the CLI and the tests).

URL and token come from arguments, else ``$NODEAGENT_URL``/``$NODEAGENT_TOKEN``, else
the client config file (``$NODEAGENT_CLIENT_CONFIG`` or ``~/.config/nodeagent/client.toml``
with keys ``url``, ``token``, ``ca`` (a CA bundle to verify the agent's cert),
``cert``/``key`` (a client cert when the agent requires one)).
"""
from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path

import requests

DEFAULT_URL = "http://127.0.0.1:8470"
DEFAULT_CLIENT_CONFIG = "~/.config/nodeagent/client.toml"
PUSH_CHUNK = 1024 * 1024  # bytes per piece of a pushed file


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status, self.code, self.message = status, code, message


def client_settings(env=None) -> dict:
    env = os.environ if env is None else env
    path = Path(os.path.expanduser(env.get("NODEAGENT_CLIENT_CONFIG") or DEFAULT_CLIENT_CONFIG))
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    if env.get("NODEAGENT_URL"):
        data["url"] = env["NODEAGENT_URL"]
    if env.get("NODEAGENT_TOKEN"):
        data["token"] = env["NODEAGENT_TOKEN"]
    data.setdefault("url", DEFAULT_URL)
    return data


class Client:
    def __init__(self, url: str, token: str | None = None, *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, timeout: float = 60):
        self.url = url.rstrip("/")
        self._token, self._ca, self._cert, self._key = token, ca, cert, key
        self.s = requests.Session()
        if token:
            self.s.headers["Authorization"] = f"Bearer {token}"
        self.verify = ca or True  # passed per request: a session default loses to $REQUESTS_CA_BUNDLE
        if cert:
            self.s.cert = (cert, key) if key else cert
        self.timeout = timeout

    @classmethod
    def from_env(cls, env=None) -> "Client":
        st = client_settings(env)
        return cls(st["url"], st.get("token"), ca=st.get("ca"), cert=st.get("cert"), key=st.get("key"))

    def request(self, method: str, path: str, *, json=None, params=None, timeout=None):
        r = self._send(method, path, json=json, params=params, timeout=timeout or self.timeout)
        ctype = r.headers.get("Content-Type", "")
        return r.json() if ctype.startswith("application/json") else r.text

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, json=body, **kw)

    def patch(self, path, body, **kw):
        return self.request("PATCH", path, json=body, **kw)

    def put(self, path, body, **kw):
        return self.request("PUT", path, json=body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def events(self, types: str | None = None, last_id: int | None = None, timeout: float | None = None):
        """Events as dicts, in order, from one stream (``GET /v1/events``): those after
        ``last_id`` first (or a ``gap`` event), then live ones until ``timeout`` seconds
        (None: until the stream ends)."""
        params = {k: v for k, v in (("type", types), ("timeout", timeout)) if v}
        headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
        try:
            with self.s.get(self.url + "/v1/events", params=params, headers=headers, stream=True,
                            timeout=(self.timeout, 60), verify=self.verify) as r:
                if r.status_code >= 400:
                    err = r.json().get("error", {})
                    raise ApiError(r.status_code, err.get("code", "http"), err.get("message", r.text[:500]))
                for line in r.iter_lines():
                    if line.startswith(b"data: "):
                        yield json.loads(line[6:])
        except requests.ConnectionError as e:
            raise ApiError(0, "unreachable", f"the event stream from {self.url} ended: {e.__class__.__name__}") \
                from None

    def push_file(self, ref: str, path: str, src, *, uid: int | None = None, gid: int | None = None,
                  mode: int | None = None) -> dict:
        """Stream the file object ``src`` to ``path`` in container ``ref``. Sent with http.client
        in PUSH_CHUNK pieces (requests would send a file in 8 KiB blocks): with Content-Length
        when ``src`` is a regular file, chunked otherwise (a pipe)."""
        from urllib.parse import quote
        headers = {k: str(v) for k, v in (("X-Nodeagent-Uid", uid), ("X-Nodeagent-Gid", gid),
                                          ("X-Nodeagent-Mode", None if mode is None else f"{mode:04o}"))
                   if v is not None}
        return self._push("PUT", f"/v1/instances/{quote(ref, safe='')}/files?path={quote(path, safe='')}", src,
                          headers)

    def upload_backup(self, src, pool: str | None = None) -> dict:
        """Stream the backup artifact in the file object ``src`` to the agent (into ``pool``)."""
        from urllib.parse import quote
        return self._push("POST", "/v1/backups" + (f"?pool={quote(pool, safe='')}" if pool else ""), src,
                          {"Content-Type": "application/x-tar"})

    def download_backup(self, backup_id: str, dst) -> dict:
        """Stream backup ``backup_id``'s artifact into the file object ``dst``, checking its
        sha256 against the agent's record; its bytes and sha256."""
        import hashlib
        h, n = hashlib.sha256(), 0
        with self._send("GET", f"/v1/backups/{backup_id}/content", stream=True, timeout=(self.timeout, 600)) as r:
            want = r.headers.get("X-Nodeagent-Sha256")
            for chunk in r.iter_content(1024 * 1024):
                dst.write(chunk)
                h.update(chunk)
                n += len(chunk)
        if want and h.hexdigest() != want:
            raise ApiError(0, "checksum", f"the download's sha256 is {h.hexdigest()}, the agent's record says "
                           f"{want}: download it again")
        return {"bytes": n, "sha256": h.hexdigest()}

    def _push(self, method: str, target: str, src, headers: dict) -> dict:
        """Send the file object ``src`` as the body of ``method target``; the JSON answer."""
        import http.client
        import ssl
        import stat
        from urllib.parse import urlsplit
        u = urlsplit(self.url)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            st = os.fstat(src.fileno())
            size = st.st_size - src.tell() if stat.S_ISREG(st.st_mode) else None
        except (OSError, AttributeError, ValueError):
            size = None
        if size is not None:
            headers["Content-Length"] = str(size)
            body = src
        else:
            body = iter(lambda: src.read(PUSH_CHUNK), b"")
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=self._ca)
            if self._cert:
                ctx.load_cert_chain(self._cert, self._key)
            conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=600,
                                               blocksize=PUSH_CHUNK)
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600, blocksize=PUSH_CHUNK)
        try:
            conn.request(method, u.path + target, body=body, headers=headers, encode_chunked=size is None)
            r = conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(0, "unreachable", f"pushing to the agent at {self.url} failed: {e}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(data)
        except ValueError:
            raise ApiError(r.status, "http", data[:500].decode(errors="replace")) from None
        if r.status >= 400:
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            raise ApiError(r.status, err.get("code", "http"), err.get("message", str(doc)[:500]))
        return doc

    def pull_file(self, ref: str, path: str, dst) -> dict:
        """Stream ``path`` of container ``ref`` into the file object ``dst``; its size, mode and owners."""
        with self._stream("GET", f"/v1/instances/{ref}/files", path, stream=True) as r:
            if r.headers.get("X-Nodeagent-Type") == "directory":
                raise ApiError(409, "conflict", f"{path} is a directory: list it with `nodeagent file list`")
            n = 0
            for chunk in r.iter_content(1024 * 1024):
                dst.write(chunk)
                n += len(chunk)
            h = r.headers
            return {"bytes": n, "mode": h.get("X-Nodeagent-Mode"), "uid": h.get("X-Nodeagent-Uid"),
                    "gid": h.get("X-Nodeagent-Gid")}

    def list_dir(self, ref: str, path: str) -> dict:
        r = self._stream("GET", f"/v1/instances/{ref}/files", path)
        if r.headers.get("X-Nodeagent-Type") != "directory":
            raise ApiError(409, "conflict", f"{path} is not a directory: pull it with `nodeagent file pull`")
        return r.json()

    def make_dir(self, ref: str, path: str, *, uid: int | None = None, gid: int | None = None,
                 mode: int | None = None) -> dict:
        headers = {"X-Nodeagent-Type": "directory"}
        headers.update({k: str(v) for k, v in (("X-Nodeagent-Uid", uid), ("X-Nodeagent-Gid", gid),
                                               ("X-Nodeagent-Mode", None if mode is None else f"{mode:04o}"))
                        if v is not None})
        return self._stream("PUT", f"/v1/instances/{ref}/files", path, data=b"", headers=headers).json()

    def _stream(self, method: str, route: str, path: str, **kw):
        return self._send(method, route, params={"path": path}, timeout=(self.timeout, 600), **kw)

    def _send(self, method: str, path: str, **kw):
        """The response to one request; ApiError for TLS, connection and HTTP errors (the
        agent's JSON error where it sent one)."""
        try:
            r = self.s.request(method, self.url + path, verify=self.verify, **kw)
        except requests.exceptions.SSLError as e:
            raise ApiError(0, "tls", f"TLS with the agent at {self.url} failed: {e}; set `ca` (and `cert`/`key` "
                           "if the agent requires client certificates) in the client config") from None
        except requests.ConnectionError as e:
            raise ApiError(0, "unreachable", f"cannot reach the agent at {self.url}: {e.__class__.__name__}; "
                           "is `nodeagent serve` running? set NODEAGENT_URL") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ApiError(r.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(r.status_code, "http", r.text[:500]) from None
        return r

    def websocket(self, path: str):
        """A websocket to ``path`` (a websockets.sync.client connection), with this client's
        token and TLS settings; ApiError for a refused upgrade (the agent's JSON error)."""
        import ssl

        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect
        url = ("wss://" + self.url[len("https://"):] if self.url.startswith("https://")
               else "ws://" + self.url.removeprefix("http://")) + path
        context = None
        if url.startswith("wss://"):
            context = ssl.create_default_context(cafile=self._ca)
            if self._cert:
                context.load_cert_chain(self._cert, self._key)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            return connect(url, additional_headers=headers, subprotocols=["nodeagent.v1"], ssl=context,
                           open_timeout=self.timeout, max_size=None, ping_interval=20, ping_timeout=60)
        except InvalidStatus as e:
            try:
                err = json.loads(e.response.body)["error"]
                raise ApiError(e.response.status_code, err["code"], err["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(e.response.status_code, "http", (e.response.body or b"")[:500].decode(
                    errors="replace")) from None
        except (OSError, InvalidHandshake, TimeoutError) as e:
            raise ApiError(0, "unreachable", f"cannot open a websocket to {url}: {e}") from None

    def wait(self, op_id: str, timeout: float = 600, on_progress=None) -> dict:
        """Poll the operation until it ends (1 s long-polls, so progress can be shown)."""
        deadline = time.monotonic() + timeout
        while True:
            op = self.get(f"/v1/operations/{op_id}/wait", params={"timeout": 1 if on_progress else 30},
                          timeout=60)
            if on_progress:
                on_progress(op)
            if op["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                return op
