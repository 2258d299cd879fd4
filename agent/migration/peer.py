"""The HTTP client of a peer agent (what the source calls on the destination, and what a
destination calls back on its source for an image), and what a peer's error answer means here."""
from __future__ import annotations

import subprocess

from agent import models
from agent.errors import (AgentError, CommandFailed, Conflict, Forbidden, InsufficientResources, NotFound,
                          Unavailable, Unprocessable)
from agent.migration.common import problems
from agent.migration.transfer import IMAGE_CHUNK

PEER_TIMEOUT_S = 30  # one control call to a peer agent
PREPARE_TIMEOUT_S = 900  # the destination may first pull the image from us
ABORT_TIMEOUT_S = 10  # cleanup on the destination is best effort: it also cleans up on restart or retry
HOST_TIMEOUT_S = 5  # GET /v1/peer/host: is it draining, how much room has it
HEALTH_TIMEOUT_S = 2  # a destination agent that does not answer /v1/health this fast is "down"


class Peers:
    """This agent's configured peers (``[peers.NAME] url, token``): a client for one, and the
    check that a caller is one."""

    def __init__(self, root):
        self.root = root

    @property
    def config(self):
        return self.root.config

    def get(self, name: str) -> PeerClient:
        pc = self.config.peers.get(name)
        if pc is None:
            known = ", ".join(sorted(self.config.peers)) or "none"
            raise Unprocessable(f"destination {name!r} is not a configured peer (configured: {known}): "
                                f"add [peers.{name}] with its url and token to this agent's config")
        return PeerClient(name, pc.url, pc.token, ca=pc.ca, cert=pc.cert, key=pc.key)

    def require(self, caller: dict | None) -> str:
        """The calling peer's name; Forbidden unless the caller's token is named after a
        configured peer (migrations are accepted only from configured peers)."""
        name = (caller or {}).get("name")
        if name not in self.config.peers or (caller or {}).get("role") not in ("peer", "admin"):
            raise Forbidden(f"token {name!r} is not a peer's: this host accepts migrations only from "
                            "configured peers, with a peer token named after the peer "
                            f"(configured peers: {', '.join(sorted(self.config.peers)) or 'none'})")
        return name


class PeerClient:
    """The API of one peer agent, with the token its config gives us, or our client certificate
    (``cert``/``key``; the peer's [api] cert_roles maps it to "peer"), and ``ca`` to verify it.
    Calls carry the request id of the work at hand (X-Request-Id), so both hosts' logs and
    operations name the same request."""

    def __init__(self, name: str, url: str, token: str | None, *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None):
        from agent import log as agent_log
        from agent.client import Client
        self.name, self.url = name, url.rstrip("/")
        self.client = Client(self.url, token, ca=ca, cert=cert, key=key, timeout=PEER_TIMEOUT_S)
        request_id = agent_log.current("request_id")
        if request_id:
            self.client.s.headers["X-Request-Id"] = request_id

    def _call(self, method: str, path: str, **kw):
        from agent.client import ApiError
        try:
            return self.client.request(method, path, **kw)
        except ApiError as e:
            if e.status in (0, 502, 503, 504):
                raise Unavailable(f"peer {self.name!r} ({self.url}) is unreachable: {e.message}") from None
            if e.status in (401, 403):
                raise Forbidden(f"peer {self.name!r} refused us: {e.message}; on {self.name}, create an admin "
                                "token named after this host and put it in this agent's "
                                f"[peers.{self.name}] token") from None
            raise peer_error(self.name, e.status, e.message) from None

    def alive(self) -> bool:
        import requests
        try:
            return self.client.s.get(self.url + "/v1/health", timeout=HEALTH_TIMEOUT_S,
                                     verify=self.client.verify).ok
        except requests.RequestException:
            return False

    def host(self) -> models.PeerHost:
        """Whether the peer takes instances (not draining) and its free capacity."""
        import requests
        try:
            answer = self._call("GET", "/v1/peer/host", timeout=HOST_TIMEOUT_S)
        except requests.RequestException as e:  # a read timeout: the client maps only connection errors
            raise Unavailable(f"peer {self.name!r} ({self.url}) did not answer in {HOST_TIMEOUT_S} s: "
                              f"{e.__class__.__name__}") from None
        return self.parse_answer(models.PeerHost, answer, "host")

    def prepare(self, req: models.IncomingMigration) -> models.IncomingPrepared:
        """The destination's answer, parsed as strictly as a request: its paths and migration URI
        reach our hypervisor."""
        body = req.model_dump(mode="json", exclude_unset=True)
        try:
            answer = self._call("POST", "/v1/peer/migrations", json=body, timeout=PREPARE_TIMEOUT_S)
        except InsufficientResources as e:
            raise InsufficientResources(f"{e.message}; {req.instance.name!r} stays here, unchanged") from None
        try:
            return self.parse_answer(models.IncomingPrepared, answer, "prepare")
        except CommandFailed:
            try:  # it prepared something: it removes it (or does on restart, or on a retry)
                self.abort(req.instance.id)
            except AgentError:
                pass
            raise

    def parse_answer(self, model, answer, what: str):
        """``answer`` as a ``model``; CommandFailed (naming the problems) if it is not one."""
        from pydantic import ValidationError
        try:
            return model.model_validate(answer)
        except ValidationError as e:
            raise CommandFailed(f"peer {self.name!r} gave a malformed answer to {what}: {problems(e)}; "
                                "nothing was done with it") from None

    def finish(self, inst_id: str, req: models.IncomingFinish) -> dict:
        """The instance's record there (models.Instance, as a dict)."""
        answer = self._call("POST", f"/v1/peer/migrations/{inst_id}/finish",
                            json=req.model_dump(mode="json", exclude_unset=True))
        return self.parse_answer(models.InstanceResult, answer, "finish").instance.model_dump(mode="json")

    def abort(self, inst_id: str) -> bool:
        return self.parse_answer(models.Deleted, self._call("DELETE", f"/v1/peer/migrations/{inst_id}",
                                                            timeout=ABORT_TIMEOUT_S), "abort").deleted

    def _send(self, inst_id: str, what: str, body, content_type: str):
        """PUT a stream to /v1/peer/migrations/{id}/{what}; the response (see _taken)."""
        import requests
        try:
            return self.client.s.put(f"{self.url}/v1/peer/migrations/{inst_id}/{what}", data=body,
                                     timeout=PREPARE_TIMEOUT_S, verify=self.client.verify,
                                     headers={"Content-Type": content_type})
        except requests.RequestException as e:
            raise Unavailable(f"peer {self.name!r} ({self.url}) is unreachable while receiving the {what}: "
                              f"{e.__class__.__name__}") from None

    def _taken(self, r, what: str) -> None:
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = f"HTTP {r.status_code} {r.text[:300]}"
            raise peer_error(self.name, r.status_code, f"did not take the {what}: {msg}")

    def push_rootfs(self, inst_id: str, upper: str, newer: float | None = None) -> int:
        """Stream ``upper`` (or what changed in it since ``newer``) as a tar; bytes sent."""
        return self._push_tree(inst_id, "rootfs", upper, newer)

    def push_volume(self, inst_id: str, vol_id: str, tree: str) -> int:
        """Stream the file tree of a container's volume (its filesystem, mounted at ``tree``)
        as a tar; bytes sent."""
        return self._push_tree(inst_id, f"volumes/{vol_id}", tree, None)

    def _push_tree(self, inst_id: str, what: str, upper: str, newer: float | None) -> int:
        argv = ["tar", "-c", "--xattrs", "--xattrs-include=trusted.*", "--numeric-owner", "-f", "-", "-C", upper]
        if newer is not None:
            argv.insert(1, f"--newer=@{newer:.0f}")
        proc = subprocess.Popen([*argv, "."], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        counted = {"n": 0}

        def body():
            while chunk := proc.stdout.read(IMAGE_CHUNK):
                counted["n"] += len(chunk)
                yield chunk
        try:
            r = self._send(inst_id, what, body(), "application/x-tar")
        except Unavailable:
            proc.kill()
            raise
        finally:
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
        if proc.returncode not in (0, 1):  # 1: a file changed while read (refresh pre-sync)
            raise CommandFailed(f"tar of {upper} failed: {err[-500:]}", stderr=err)
        self._taken(r, what)
        return counted["n"]

    def push_disk(self, inst_id: str, path: str, progress=None) -> int:
        """Stream a stopped VM's disk file (its own qcow2 layer); bytes sent. ``progress(done)``
        after each chunk (a cancel point: it may raise)."""
        return self._push_file(inst_id, "disk", path, progress)

    def push_volume_file(self, inst_id: str, vol_id: str, path: str, progress=None) -> int:
        """Stream a VM's volume (its raw file, all of it: the destination writes exactly its
        size, holes where zeros come); bytes sent."""
        return self._push_file(inst_id, f"volumes/{vol_id}", path, progress)

    def _push_file(self, inst_id: str, what: str, path: str, progress) -> int:
        counted = {"n": 0}

        def body():
            with open(path, "rb") as f:
                while chunk := f.read(IMAGE_CHUNK):
                    counted["n"] += len(chunk)
                    if progress:
                        progress(counted["n"])
                    yield chunk
        self._taken(self._send(inst_id, what, body(), "application/octet-stream"), what)
        return counted["n"]

    def download_image(self, image_id: str, dest: str, limit: int) -> str:
        """Write the image's bytes (at most ``limit``) to ``dest``; their sha256 (hex)."""
        import hashlib

        import requests
        h, n = hashlib.sha256(), 0
        try:
            with self.client.s.get(f"{self.url}/v1/peer/images/{image_id}", stream=True,
                                   timeout=PEER_TIMEOUT_S, verify=self.client.verify) as r:
                if r.status_code != 200:
                    raise CommandFailed(f"peer {self.name!r} did not send image {image_id[:12]}: "
                                        f"HTTP {r.status_code} {r.text[:300]}")
                with open(dest, "wb") as f:
                    for chunk in r.iter_content(IMAGE_CHUNK):
                        n += len(chunk)
                        if n > limit:
                            raise Unprocessable(f"peer {self.name!r} sent more than {limit} bytes for image "
                                                f"{image_id[:12]}, more than it declared: refused")
                        h.update(chunk)
                        f.write(chunk)
        except requests.RequestException as e:
            raise Unavailable(f"peer {self.name!r} ({self.url}) is unreachable while sending image "
                              f"{image_id[:12]}: {e.__class__.__name__}") from None
        return h.hexdigest()


def peer_error(peer: str, status: int, message: str) -> AgentError:
    """The error a peer's HTTP error answer means here."""
    if status == InsufficientResources.http_status:
        return InsufficientResources(f"destination {peer!r} is out of space: {message}")
    err = {404: NotFound, 409: Conflict, 422: Unprocessable}.get(status, CommandFailed)
    return err(f"peer {peer!r}: {message}")
