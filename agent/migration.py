"""The control domain: moving instances to another host, agent to agent.

Terms: the *source* agent owns the instance and orchestrates; the *destination* agent
is a configured peer (``[peers.NAME] url, token`` in the source's config). Protocol:

1. source -> destination ``POST /v1/peer/migrations``: the destination checks the
   caller is one of *its* configured peers, pulls the image from the source if it lacks
   it (``GET /v1/peer/images/{id}`` on the source), creates the instance's volume
   (same size; a qcow2 overlay on the same base image), seed and row (state ``incoming``)
   and answers with its disk paths and its libvirt migration URI. Shared storage (a VM on
   a ``block`` pool): the destination makes no volume; it checks its pool of the same name
   holds the very image, adopts it (records a reference), writes the seed, defines the
   cephx libvirt secret and answers the same ``rbd:pool/image``;
2. the source runs the hypervisor's peer-to-peer live migration to that URI, with the
   writable disks copied (local pools; memory only for shared storage) and progress
   sampled into the operation; it
   aborts the job if the destination agent stops answering;
3. source -> destination ``POST /v1/peer/migrations/{id}/finish``: the destination
   confirms the guest runs there and its record becomes the instance's record;
4. the source deletes its record and releases its volumes (shared volumes are only
   forgotten: the destination owns them now).

On any failure before 3 the guest keeps running on the source, the source calls
``DELETE /v1/peer/migrations/{id}`` so the destination removes what it prepared
(a destination that was down cleans up on restart, or when the migration is retried;
it never deletes an adopted shared volume), and the operation fails with what went wrong.

Trust: a destination accepts these calls only from a token whose *name* is one of its
configured peers and whose role is peer (or admin): create it on the destination with
``nodeagent token create <source-peer-name> --role peer`` and put the secret in the
source's ``[peers.<destination>] token``. A peer is still not a friend: every field it sends
has the public API's constrained type (agent/models.py), the rootfs stream is unpacked by the
hardened extractor (storage/upper.py), a disk layer may reference no file but the image's base,
an image it sends must have the digest asked for, and it touches only the incoming instances it
prepared (SOURCE_FILE); the source parses the destination's answers as strictly (its migration
URI reaches libvirt), and exports only the image of an instance it is sending to that peer.

Cancel (``DELETE /v1/operations/{id}``) fails a migration the same way until the guest
runs on the destination: that is the operation's point of no return (a later cancel gets 409).

Space: the source sends how much the copy writes (its disk's own allocated bytes, or the
container's upper dir) and the image's size; a destination whose local pool cannot take
that plus SPACE_HEADROOM refuses at 1 (507 ``insufficient_resources``), and a pool that
fills up during the copy fails it the same way, naming the pool and saying to free space
or pick another host.

Stopped VMs move offline: after 1, the source streams the disk's own qcow2 layer
(``PUT /v1/peer/migrations/{id}/disk``; the destination rebases it onto its copy of the
same base image) and 3 (``define: true``) defines the domain there, stopped.

Finish is idempotent and retried while the destination is unreachable: a retry gets the
record adopted by an earlier finish (whose answer was lost) or, for a running VM, by the
destination agent's restart. If a live-migrated VM's destination stays down through the
retries, the source's record goes to state ``error`` and the operation says the VM runs
on the destination: nothing is lost; delete the stale record. A container is started
here again instead (it may never have started there); if the destination had started it
and died before answering, that copy runs on until the destination agent restarts, whose
``recover()`` removes every incoming instance it finds that is not a running VM.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid

from agent import models
from agent.services.records import Instance
from agent.errors import (AgentError, Cancelled, CommandFailed, Conflict, Forbidden, InsufficientResources,
                          InvalidInput, NotFound, Unavailable, Unprocessable, Unsupported)
from hypervisor.driver import SupportsIncomingDisks, SupportsMigration
from storage.units import MiB

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 30  # one control call to a peer agent
PREPARE_TIMEOUT_S = 900  # the destination may first pull the image from us
ABORT_TIMEOUT_S = 10  # cleanup on the destination is best effort: it also cleans up on restart or retry
HEALTH_TIMEOUT_S = 2  # a destination agent that does not answer /v1/health this fast is "down"
HEALTH_INTERVAL_S = 1.0  # how often the source checks the destination agent during the copy
HEALTH_FAILURES = 3  # consecutive failed checks before the source aborts the migration
FINISH_ATTEMPTS = 5  # confirming is retried: the guest already runs there
FINISH_RETRY_S = 2
IMAGE_CHUNK = 1024 * 1024
CRIU_CHECK_TIMEOUT_S = 30
INCOMING = "incoming"  # instance state on the destination until the source confirms
INSTANCE_FIELDS = ("id", "name", "kind", "pool", "volumes", "mac", "ip")  # what the destination's record keeps
ADOPTED_STATES = ("running", "paused", "stopped", "created")  # after finish: a repeated one gets the record
SPACE_HEADROOM = 64 * 1024 * 1024  # 64 MiB a local pool keeps free after taking an instance (qcow2
# metadata, what the guest writes during the copy): a destination below it refuses at prepare
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as tar, QEMU and libvirt report it
ROOTFS_MAX_BYTES = 1024**4  # 1 TiB: what one rootfs stream may unpack to (the API caps the stream the same)
IMAGE_DOWNLOAD_SLACK = 16 * MiB  # an OCI archive's tar headers and index over the image's declared size
IMAGE_DOWNLOAD_MAX = 1024**4  # what a source that declares no image size may send


# -- talking to a peer agent --------------------------------------------------------------

class PeerClient:
    """The API of one peer agent, with the token its config gives us."""

    def __init__(self, name: str, url: str, token: str | None):
        from agent.client import Client
        self.name, self.url = name, url.rstrip("/")
        self.client = Client(self.url, token, timeout=PEER_TIMEOUT_S)

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

    def prepare(self, body: dict) -> dict:
        """The destination's answer (models.IncomingPrepared, as a dict), parsed as strictly as
        a request: its paths and migration URI reach our hypervisor."""
        try:
            answer = self._call("POST", "/v1/peer/migrations", json=body, timeout=PREPARE_TIMEOUT_S)
        except InsufficientResources as e:
            raise InsufficientResources(f"{e.message}; {body['instance']['name']!r} stays here, unchanged") from None
        try:
            return self.parse_answer(models.IncomingPrepared, answer, "prepare")
        except CommandFailed:
            try:  # it prepared something: it removes it (or does on restart, or on a retry)
                self.abort(body["instance"]["id"])
            except AgentError:
                pass
            raise

    def parse_answer(self, model, answer, what: str) -> dict:
        from pydantic import ValidationError
        try:
            return model.model_validate(answer).model_dump(exclude_none=True)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                 for err in e.errors(include_url=False, include_input=False)[:5])
            raise CommandFailed(f"peer {self.name!r} gave a malformed answer to {what}: {problems}; "
                                "nothing was done with it") from None

    def finish(self, inst_id: str, body: dict) -> dict:
        return self._call("POST", f"/v1/peer/migrations/{inst_id}/finish", json=body)

    def abort(self, inst_id: str) -> bool:
        return self.parse_answer(models.Deleted, self._call("DELETE", f"/v1/peer/migrations/{inst_id}",
                                                            timeout=ABORT_TIMEOUT_S), "abort")["deleted"]

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
            r = self._send(inst_id, "rootfs", body(), "application/x-tar")
        except Unavailable:
            proc.kill()
            raise
        finally:
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
        if proc.returncode not in (0, 1):  # 1: a file changed while read (refresh pre-sync)
            raise CommandFailed(f"tar of {upper} failed: {err[-500:]}", stderr=err)
        self._taken(r, "rootfs")
        return counted["n"]

    def push_disk(self, inst_id: str, path: str, progress=None) -> int:
        """Stream a stopped VM's disk file (its own qcow2 layer); bytes sent. ``progress(done)``
        after each chunk (a cancel point: it may raise)."""
        counted = {"n": 0}

        def body():
            with open(path, "rb") as f:
                while chunk := f.read(IMAGE_CHUNK):
                    counted["n"] += len(chunk)
                    if progress:
                        progress(counted["n"])
                    yield chunk
        self._taken(self._send(inst_id, "disk", body(), "application/octet-stream"), "disk")
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


def allocated_bytes(path: str | None) -> int:
    """Bytes a file, or a directory tree, really occupies: what copying it writes."""
    if not path or not os.path.exists(path):
        return 0
    if not os.path.isdir(path):
        return os.stat(path).st_blocks * 512
    n = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                n += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # removed while we walk (a running container)
    return n


def criu_works() -> tuple[bool, str]:
    """Whether ``criu check`` passes here (container live migration needs it), and why not."""
    if not shutil.which("criu"):
        return False, "criu is not installed"
    try:
        r = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=CRIU_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, "`criu check` timed out"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return False, f"`criu check` fails: {lines[-1] if lines else 'exit ' + str(r.returncode)}"
    return True, ""


LAYERS_FILE = "rootfs-layers.json"  # destination: where a prepared container's layers are
SOURCE_FILE = "migration-source"  # destination: the peer that prepared the instance (only it may go on)
SHARED_FILE = "shared-volumes.json"  # destination: the adopted shared volumes (never deleted on abort)
LOCAL_POOL_KINDS = ("local", "fake")  # pools whose volumes are host-local: migration copies them


class _Counted:
    """A read()-able stream that counts what was read from it."""

    def __init__(self, stream):
        self.stream, self.n = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: the sender gets our answer, not a reset."""
        while self.read(IMAGE_CHUNK):
            pass


def untar_into(dest: str, stream) -> int:
    """Unpack a peer's tar stream of a container's upper dir into ``dest`` with the hardened
    extractor (storage/upper.py: nothing an earlier stream left there is followed; owners,
    modes, whiteouts and overlay xattrs kept); bytes read. A refused or failed stream is
    drained, then raised: InvalidInput, or InsufficientResources when the pool fills up."""
    from storage.upper import unpack_upper
    counted = _Counted(stream)
    try:
        unpack_upper(counted, dest, max_bytes=ROOTFS_MAX_BYTES, label="the rootfs stream")
    except OSError as e:
        counted.drain()
        if e.errno == errno.ENOSPC:
            raise InsufficientResources(f"{dest}: {NO_SPACE.lower()} after {counted.n // MiB} MiB of the "
                                        "rootfs") from None
        raise
    except BaseException:
        counted.drain()
        raise
    counted.drain()  # the tar's end-of-archive padding
    return counted.n


def check_disk_layer(info: dict, image, base: str | None) -> None:
    """InvalidInput unless ``info`` (qemu-img info of a peer's disk file, which opens neither a
    backing nor a data file) is a plain qcow2 layer: no external data file, no encryption, and
    no backing reference but the source's copy of ``image`` (``.../<image id>``), which the
    caller replaces with this pool's ``base``."""
    if info.get("format") != "qcow2":
        raise InvalidInput(f"the disk sent is {info.get('format')!r}, not a qcow2 layer")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise InvalidInput(f"the disk sent uses an external data file ({data.get('data-file')!r}): refused "
                           "(it would write to a file of this host)")
    if data.get("encrypt") or info.get("encrypted"):
        raise InvalidInput("the disk sent is encrypted: refused")
    backing = info.get("backing-filename")
    if backing is not None:
        fmt = info.get("backing-filename-format")
        if base is None or not backing.startswith("/") or os.path.basename(backing) != image.id \
                or fmt not in (None, image.format):
            raise InvalidInput(f"the disk sent has the backing file {backing[:200]!r} ({fmt}): only the "
                               f"source's copy of image {image.id[:12]} ({image.format}) may be its base")


def rootfs_paths(upper: str) -> list[str]:
    """Every path under ``upper``, relative ("./a/b"), as tar names them."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        for n in dirnames + filenames:
            out.append(os.path.normpath(os.path.join(rel, n)))
    return out


def prune_rootfs(upper: str, keep: set[str]) -> int:
    """Remove what is under ``upper`` but not in ``keep`` (deleted on the source after the
    first sync); the number removed."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(upper, topdown=True):
        rel = os.path.relpath(dirpath, upper)
        for name in list(dirnames):
            p = os.path.normpath(os.path.join(rel, name))
            if p not in keep:
                shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                dirnames.remove(name)
                n += 1
        for name in filenames:
            if os.path.normpath(os.path.join(rel, name)) not in keep:
                os.unlink(os.path.join(dirpath, name))
                n += 1
    return n


# -- the service ----------------------------------------------------------------------------

class MigrationService:
    def __init__(self, root):
        self.root = root
        self._live: dict[str, dict] = {}  # migration (= operation) id -> live figures
        self._busy: set[str] = set()  # instance ids being migrated away
        self._sending: dict[str, str] = {}  # instance id being migrated away -> destination peer
        self._lock = threading.Lock()

    @property
    def config(self):
        return self.root.config

    def peer(self, name: str) -> PeerClient:
        pc = self.config.peers.get(name)
        if pc is None:
            known = ", ".join(sorted(self.config.peers)) or "none"
            raise Unprocessable(f"destination {name!r} is not a configured peer (configured: {known}): "
                                f"add [peers.{name}] with its url and token to this agent's config")
        return PeerClient(name, pc.url, pc.token)

    def require_peer(self, caller: dict | None) -> str:
        """The calling peer's name; Forbidden unless the caller's token is named after a
        configured peer (migrations are accepted only from configured peers)."""
        name = (caller or {}).get("name")
        if name not in self.config.peers or (caller or {}).get("role") not in ("peer", "admin"):
            raise Forbidden(f"token {name!r} is not a peer's: this host accepts migrations only from "
                            "configured peers, with a peer token named after the peer "
                            f"(configured peers: {', '.join(sorted(self.config.peers)) or 'none'})")
        return name

    # -- source side --
    def create(self, req: models.MigrationCreate) -> dict:
        inst = self.root.instances.get(req.instance)
        peer = self.peer(req.destination)
        if inst.state in ("creating", INCOMING):
            raise Conflict(f"instance {inst.name!r} is {inst.state}: wait for its operation")
        if inst.kind == "vm" and inst.state == "stopped":
            kind = self.root.pools[inst.pool].kind
            if kind != "local":
                raise Unsupported(f"VM {inst.name!r} is stopped and its disk is on pool {inst.pool!r} "
                                  f"({kind}): an offline move copies local disks only; start it and migrate "
                                  "it live")
        elif inst.kind == "vm":
            if not isinstance(self.root.driver, SupportsMigration):
                raise Unsupported(f"the {self.config.hypervisor.driver} driver cannot migrate VMs")
            if inst.state not in ("running", "paused"):
                raise Unprocessable(f"VM {inst.name!r} is {inst.state}: migration moves running, paused "
                                    "and stopped VMs; start or stop it first")
        else:
            if req.mode == "live":
                ok, why = criu_works()
                raise Unsupported("live migration of containers needs CRIU and "
                                  f"{why or 'CRIU restore is not wired up'} "
                                  "on this host: use mode=refresh (sync while running, stop, final sync, start "
                                  "there; about a second of downtime) or mode=cold")
        if inst.kind == "vm" and req.mode == "refresh":
            raise Unprocessable("mode=refresh is for containers: migrate VMs with mode=live or mode=cold")
        with self._lock:
            if inst.id in self._busy:
                raise Conflict(f"instance {inst.name!r} is already being migrated")
            self._busy.add(inst.id)
            self._sending[inst.id] = peer.name

        def work(op):
            try:
                with self.root.instances.lock(inst.id):
                    if inst.kind == "vm" and self.root.driver.get(inst.name).state == "stopped":
                        return self._move_stopped_vm(op, inst.id, peer)
                    if inst.kind == "vm":
                        return self._migrate_vm(op, inst.id, peer, req.mode)
                    return self._migrate_container(op, inst.id, peer, req.mode)
            finally:
                with self._lock:
                    self._busy.discard(inst.id)
                    self._sending.pop(inst.id, None)

        try:
            op = self.root.operations.submit("migration", inst.id, work)
        except BaseException:
            with self._lock:
                self._busy.discard(inst.id)
                self._sending.pop(inst.id, None)
            raise
        self._live[op["id"]] = {"instance": inst.id, "name": inst.name, "destination": peer.name,
                                "mode": req.mode}
        return op

    def get(self, mig_id: str) -> dict:
        try:
            op = self.root.operations.get(mig_id)
        except NotFound:
            op = None
        if op is None or op["kind"] != "migration":
            raise NotFound(f"migration {mig_id} not found")
        live = self._live.get(mig_id, {})
        res = op["result"] or {}
        prog = op["progress"] or {}
        return {"id": op["id"], "operation": op["id"], "instance": op["target"],
                "name": live.get("name") or res.get("name"),
                "destination": live.get("destination") or res.get("destination"),
                "mode": live.get("mode") or res.get("mode"), "status": op["status"],
                "phase": prog.get("phase"),
                "bytes": {"processed": res.get("bytes", live.get("processed")),
                          "total": live.get("total"), "remaining": live.get("remaining")},
                "dirty_rate": live.get("dirty_rate"),
                "downtime_ms": res.get("downtime_ms"), "total_ms": res.get("total_ms"),
                "error": op["error"]}

    def _migrate_vm(self, op, inst_id: str, peer: PeerClient, mode: str) -> dict:
        from hypervisor.driver import MigrationOptions
        inst = self.root.instances.get(inst_id)
        name = inst.name
        spec = inst.spec_dict()
        image = self.root.store.get(inst.image)
        pool = self.root.pools[inst.pool]
        vol = pool.get_volume(inst.volumes[0])
        op.phase("prepare")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: the instance stays here")
        shared = pool.kind not in LOCAL_POOL_KINDS
        body = {"instance": {k: v for k, v in inst.to_dict().items() if k in INSTANCE_FIELDS},
                "spec": spec, "disk_size": vol.size, "image_bytes": image.size,
                "data_bytes": allocated_bytes(vol.path) if pool.kind == "local" else 0,
                "image": {"id": image.id, "name": image.name, "format": image.format, "kind": image.kind}}
        if shared:
            body["shared_volumes"] = {v: pool.get_volume(v).uri for v in inst.volumes}
        prepared = peer.prepare(body)
        live = self._live.setdefault(op.id, {})
        down = {"failures": 0, "last": time.monotonic()}

        def progress(p):
            live.update(processed=p.data_processed, total=p.data_total, remaining=p.data_remaining,
                        dirty_rate=p.dirty_rate)
            op.bytes(p.data_processed, p.data_total or None)

        def cancelled() -> bool:
            if op.cancelled.is_set():
                return True
            if time.monotonic() - down["last"] >= HEALTH_INTERVAL_S:
                down["last"] = time.monotonic()
                down["failures"] = 0 if peer.alive() else down["failures"] + 1
            return down["failures"] >= HEALTH_FAILURES

        options = MigrationOptions(
            live=(mode == "live"), copy_storage="none" if shared else "incremental",
            disk_sources=prepared["disk_sources"], disk_attach=prepared.get("disk_attach") or {},
            console_log=prepared.get("console_log"))
        try:
            op.phase("migrate")
            if not peer.alive():
                raise Unavailable(f"peer {peer.name!r} ({peer.url}) stopped answering before the copy: "
                                  f"{name!r} keeps running here; retry when it is back")
            try:
                result = self.root.driver.migrate(name, prepared["migration_uri"], options,
                                                  progress=progress, cancelled=cancelled)
            except Cancelled:
                if op.cancelled.is_set():
                    raise
                raise Unavailable(f"peer {peer.name!r} stopped answering during the migration: it was "
                                  f"aborted and {name!r} keeps running here") from None
            except CommandFailed as e:
                if NO_SPACE not in e.message:
                    raise
                raise InsufficientResources(
                    f"destination {peer.name!r} is out of space: its pool {inst.pool!r} filled up during "
                    f"the disk copy ({NO_SPACE}); {name!r} keeps running here: free space on {peer.name} "
                    "or migrate it to another host", stderr=e.message[-2000:]) from None
        except BaseException as e:
            self._abort_remote(peer, inst_id, e)
            raise
        op.point_of_no_return()
        # the guest runs there now; only the records are left to move
        op.phase("confirm")
        moved = self._finish_remote(peer, inst_id, name)
        op.phase("cleanup")
        self._forget_local(inst_id, shared=shared)
        log.info("instance migrated", extra={"instance": name, "destination": peer.name,
                                             "downtime_ms": result.downtime_ms, "total_ms": result.total_ms})
        return {"instance": moved, "name": name, "destination": peer.name, "mode": mode,
                "downtime_ms": result.downtime_ms, "total_ms": round(result.total_ms, 1),
                "bytes": result.data_bytes}

    def _move_stopped_vm(self, op, inst_id: str, peer: PeerClient) -> dict:
        """Offline: the destination prepares (overlay on the same base, seed, row), takes the
        disk's own layer as a file, and defines the domain stopped; then it goes from here.
        On failure the VM stays here (stopped, untouched) and the destination removes what it made."""
        inst = self.root.instances.get(inst_id)
        name = inst.name
        image = self.root.store.get(inst.image)
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        t0 = time.monotonic()
        op.phase("prepare")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: the instance stays here")
        body = {"instance": {k: v for k, v in inst.to_dict().items() if k in INSTANCE_FIELDS},
                "spec": inst.spec_dict(), "disk_size": vol.size,
                "data_bytes": allocated_bytes(vol.path), "image_bytes": image.size,
                "image": {"id": image.id, "name": image.name, "format": image.format, "kind": image.kind}}
        peer.prepare(body)
        try:
            op.phase("copy", bytes_total=os.path.getsize(vol.path))
            sent = peer.push_disk(inst_id, vol.path, progress=op.bytes)
            op.phase("define")
            moved = self._confirm(peer, inst_id, {"define": True})
        except BaseException as e:
            self._abort_remote(peer, inst_id, e)
            if isinstance(e, InsufficientResources):
                raise InsufficientResources(f"{e.message}; VM {name!r} stays here, stopped: free space on "
                                            f"{peer.name} or migrate it to another host") from None
            raise
        op.point_of_no_return()
        op.phase("cleanup")
        self.root.driver.delete(name)
        self._forget_local(inst_id)
        log.info("stopped VM moved", extra={"instance": name, "destination": peer.name, "bytes": sent})
        return {"instance": moved, "name": name, "destination": peer.name, "mode": "cold",
                "downtime_ms": None, "total_ms": round((time.monotonic() - t0) * 1000, 1), "bytes": sent}

    def _migrate_container(self, op, inst_id: str, peer: PeerClient, mode: str) -> dict:
        """cold: stop, copy the upper dir, start there. refresh: copy the upper dir while it
        runs, stop, copy what changed since (and prune what went), start there. On failure
        the container runs here again and the destination removes what it made."""
        inst = self.root.instances.get(inst_id)
        name = inst.name
        image = self.root.store.get(inst.image)
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        upper = os.path.join(vol.path, "upper")
        op.phase("prepare")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: the instance stays here")
        body = {"instance": {k: v for k, v in inst.to_dict().items() if k in INSTANCE_FIELDS},
                "spec": inst.spec_dict(),
                "data_bytes": allocated_bytes(upper), "image_bytes": image.size,
                "image": {"id": image.id, "name": image.name, "format": image.format, "kind": image.kind}}
        peer.prepare(body)
        was_running = self.root.runtime.get(name).state == "running"
        stopped_at = None
        sent = 0
        try:
            since = None
            if mode == "refresh" and was_running:
                op.phase("presync")
                since = time.time() - 1  # mtime/ctime granularity: resend the last second
                sent += peer.push_rootfs(inst_id, upper)
            op.phase("stop")
            if was_running:
                stopped_at = time.monotonic()
                self.root.runtime.stop(name, timeout=10)
            op.phase("sync")
            sent += peer.push_rootfs(inst_id, upper, newer=since)
            keep = rootfs_paths(upper) if since is not None else None
            op.phase("confirm")
            moved = self._confirm(peer, inst_id, {"start": was_running, "keep": keep})
        except BaseException as e:
            self._abort_remote(peer, inst_id, e)
            if stopped_at is not None:
                self.root.runtime.start(name)
            if isinstance(e, InsufficientResources):
                raise InsufficientResources(f"{e.message}; container {name!r} keeps running here: free space "
                                            f"on {peer.name} or migrate it to another host") from None
            raise
        op.point_of_no_return()  # it runs there now
        downtime = (time.monotonic() - stopped_at) * 1000 if stopped_at is not None else None
        op.phase("cleanup")
        self.root.runtime.delete(name)
        self._forget_local(inst_id)
        return {"instance": moved, "name": name, "destination": peer.name, "mode": mode,
                "downtime_ms": round(downtime, 1) if downtime is not None else None,
                "total_ms": None, "bytes": sent}

    def _abort_remote(self, peer: PeerClient, inst_id: str, cause: BaseException) -> None:
        try:
            peer.abort(inst_id)
        except AgentError as e:
            log.warning("destination could not clean up after a failed migration; it will on restart "
                        "or when the migration is retried",
                        extra={"peer": peer.name, "instance": inst_id, "error": e.message,
                               "cause": str(cause)})

    def _confirm(self, peer: PeerClient, inst_id: str, body: dict) -> dict:
        """Finish on the destination, retried while it is unreachable (finish is idempotent
        there: an answer lost on the way is asked for again); the last error if it stays so."""
        for attempt in range(FINISH_ATTEMPTS):
            try:
                return peer.finish(inst_id, body)["instance"]
            except Unavailable:
                if attempt == FINISH_ATTEMPTS - 1:
                    raise
                time.sleep(FINISH_RETRY_S)

    def _finish_remote(self, peer: PeerClient, inst_id: str, name: str) -> dict:
        last = None
        for _ in range(FINISH_ATTEMPTS):
            try:
                return peer.finish(inst_id, {"resume": True})["instance"]
            except (Unavailable, CommandFailed) as e:
                last = e
                time.sleep(FINISH_RETRY_S)
        self.root.records.update(inst_id, state="error",
                                 error=f"migrated to {peer.name}, which did not confirm: it runs there; "
                                       "delete this record")
        raise CommandFailed(f"VM {name!r} now runs on {peer.name}, but its agent did not confirm ({last}): "
                            f"{peer.name} adopts the VM when its agent is back (it does at start); this host's "
                            f"record is in state error: check {name!r} on {peer.name}, then delete the record "
                            "here (that removes only this host's record and disk)")

    def _forget_local(self, inst_id: str, shared: bool = False) -> None:
        """The instance left: its record, volumes and files go (the domain already went).
        ``shared``: its volumes stay (the destination owns them); only our references go."""
        inst = self.root.instances.get(inst_id)
        if inst.kind == "vm" and self.root.driver.find(inst.name) is not None:
            raise CommandFailed(f"VM {inst.name!r} is still defined here after its migration")
        for vol in inst.volumes:
            if shared:
                self.root.store.forget_volume(inst.pool, vol)
            else:
                self.root.store.release(inst.pool, vol)
        if shared:
            self._drop_unused_secrets(inst_id)  # libvirt undefined the domain, not its secret
        if inst.kind == "vm":
            self.root.instances.release_address(inst_id)
        shutil.rmtree(self.config.state_path / "instances" / inst_id, ignore_errors=True)
        self.root.records.delete(inst_id, state="migrated")

    # -- destination side --
    def prepare_incoming(self, caller: dict, req: models.IncomingMigration) -> dict:
        """Make what the VM needs here (image, volume, seed, row in state ``incoming``).
        On failure nothing is left."""
        source = self.require_peer(caller)
        inst = req.instance
        self._clear_stale(source, inst.id, inst.name)
        cfg = self.config
        if req.shared_volumes and inst.pool not in cfg.pools:
            raise Unprocessable(f"pool {inst.pool!r} is not configured here: shared storage needs "
                                f"[pools.{inst.pool}] naming the same Ceph pool on both hosts")
        pool = inst.pool if inst.pool in cfg.pools else cfg.default_pool
        self._check_volumes_free(pool, inst.volumes, shared=bool(req.shared_volumes))
        self._check_space(pool, req)
        image = self._ensure_image(source, req.image, req.image_bytes)
        now = time.time()
        spec = dict(req.spec.model_dump(), image_id=image.id)
        if not self.root.records.insert(Instance(
                id=inst.id, name=inst.name, kind=inst.kind, image=image.id, state=INCOMING, pool=pool, spec=spec,
                volumes=tuple(inst.volumes), mac=inst.mac, node=self.root.host.hostname(),
                created_at=now, updated_at=now)):
            raise Conflict(f"an instance named {inst.name!r} exists here: delete it or rename before "
                           "migrating")
        try:
            (self.root.instances.instance_dir(inst.id) / SOURCE_FILE).write_text(source)
            if inst.kind == "container":
                return self._prepare_container(inst, image, pool)
            if req.shared_volumes:
                return self._prepare_shared_vm(inst, spec, image, pool, req.shared_volumes)
            return self._prepare_vm(inst, spec, image, pool, req.disk_size)
        except BaseException:
            self._destroy_incoming(inst.id)
            raise

    def _check_volumes_free(self, pool: str, volumes, shared: bool) -> None:
        """Conflict if an instance here has a volume of these names (a peer names the volumes it
        sends; a failed prepare removes them), or, unless shared, the pool holds one already."""
        backend = self.root.pools[pool]
        for other in self.root.records.list():
            taken = set(other.volumes) & set(volumes)
            if taken:
                raise Conflict(f"volume {sorted(taken)[0]!r} belongs to instance {other.name!r} here: "
                               "an incoming instance brings volumes of its own")
        for vol in volumes if not shared else ():
            if backend.find_volume(vol) is not None:
                raise Conflict(f"pool {pool!r} holds a volume {vol!r} already: an incoming instance "
                               "brings volumes of its own")

    def _check_space(self, pool: str, req: models.IncomingMigration) -> None:
        """InsufficientResources unless local pool ``pool`` can take the instance's data (its
        written disk or rootfs, and its image if missing here) and keep SPACE_HEADROOM free.
        Shared pools (block, object) take no copy and report their own full errors."""
        backend = self.root.pools[pool]
        if backend.kind != "local":
            return
        need = req.data_bytes or 0
        if req.image_bytes and self.root.store.find(req.image.id) is None:
            need += req.image_bytes * (2 if req.image.kind == "container" else 1)  # layers: blobs + unpacked
        free = backend.usage().available
        if free < need + SPACE_HEADROOM:
            raise InsufficientResources(
                f"pool {pool!r} on {self.root.host.hostname()} ({self.config.api.listen}) has "
                f"{free / MiB:.1f} MiB free; {req.instance.kind} {req.instance.name!r} needs {need / MiB:.1f} MiB "
                f"plus {SPACE_HEADROOM // MiB} MiB headroom: free space in that pool (or grow it), or migrate "
                "to another host")

    def _prepare_vm(self, inst, spec, image, pool, disk_size) -> dict:
        from agent.services.assembly import ROOT_TARGET, SEED_TARGET
        vol, seed = self.root.assembly.vm_disks(inst.id, inst.name, image.id, pool, inst.volumes[0],
                                                size=disk_size, user_data=spec.get("user_data"),
                                                ip=self._incoming_address(inst, spec))
        if not vol.path:
            raise Unsupported(f"pool {pool!r} gives no file path for disks; live migration with copied "
                              "storage needs a local pool")
        d = self.root.instances.instance_dir(inst.id)
        return {"disk_sources": {ROOT_TARGET: vol.path, SEED_TARGET: seed}, "console_log": str(d / "console.log"),
                "migration_uri": self.migration_uri()}

    def _incoming_address(self, inst, spec) -> str | None:
        """A bridged VM's address here: the one it had there if this host's network has it
        free, else a new one (its seed says so, for its next boot); recorded on its row."""
        if spec.get("network") != "bridge":
            return None
        ip = self.root.assembly.vm_address(inst.id, inst.ip)
        if ip:
            self.root.records.update(inst.id, ip=ip)
        return ip

    def _prepare_shared_vm(self, inst, spec, image, pool, shared: dict) -> dict:
        """Shared storage: adopt the volumes the source uses (the same RBD images: nothing is
        copied or cloned), write the seed, define the cephx secret; answer the same images."""
        from hypervisor.disks import disk_for_volume
        from agent.services.assembly import ROOT_TARGET, SEED_TARGET
        d = self.root.instances.instance_dir(inst.id)
        (d / SHARED_FILE).write_text(json.dumps(list(inst.volumes)))  # first: cleanup never deletes them
        backend = self.root.pools[pool]
        if backend.kind in LOCAL_POOL_KINDS or set(shared) != set(inst.volumes):
            raise Unprocessable(f"pool {pool!r} here is a {backend.kind} pool, not shared storage: "
                                f"[pools.{pool}] must name the same Ceph pool on both hosts")
        vol = self.root.store.adopt_volume(image.id, pool, inst.volumes[0])
        if vol.uri != shared[inst.volumes[0]]:
            raise Unprocessable(f"volume {vol.name} is {vol.uri} here but {shared[inst.volumes[0]]} on the "
                                f"source: [pools.{pool}] must name the same Ceph pool on both hosts")
        seed = self.root.assembly.vm_seed(inst.id, inst.name, user_data=spec.get("user_data"),
                                          ip=self._incoming_address(inst, spec))
        root = disk_for_volume(vol, ROOT_TARGET)
        if isinstance(self.root.driver, SupportsIncomingDisks):
            (root,) = self.root.driver.prepare_incoming_disks((root,))
        attach = {k: v for k, v in root.attach.items() if k in ("monitors", "config", "user", "secret_uuid")}
        return {"disk_sources": {ROOT_TARGET: vol.uri, SEED_TARGET: seed}, "disk_attach": {ROOT_TARGET: attach},
                "console_log": str(d / "console.log"), "migration_uri": self.migration_uri()}

    def _destroy_incoming(self, inst_id: str) -> bool:
        """Remove a prepared incoming instance; adopted shared volumes are only forgotten
        (the source's guest still uses them), never deleted."""
        shared_file = self.config.state_path / "instances" / inst_id / SHARED_FILE
        try:
            shared = json.loads(shared_file.read_text())
        except (FileNotFoundError, ValueError):
            shared = None
        if shared is not None:
            inst = self.root.records.find_id(inst_id)
            if inst is not None:
                for vol in shared:
                    self.root.store.forget_volume(inst.pool, vol)
                self.root.records.update(inst_id, volumes=())
        gone = self.root.instances.destroy(inst_id)
        if shared is not None:
            self._drop_unused_secrets(inst_id)
        return gone

    def _drop_unused_secrets(self, leaving: str) -> None:
        """The Ceph secrets no domain uses go, unless another incoming migration is under
        way here: its secret is unused until its domain arrives at the switchover."""
        if isinstance(self.root.driver, SupportsIncomingDisks) and not any(
                i.id != leaving for i in self.root.records.list(states=(INCOMING,))):
            self.root.driver.delete_unused_secrets()

    def _prepare_container(self, inst, image, pool) -> dict:
        layers = self.root.store.prepare_rootfs(image.id, inst.volumes[0], pool=pool)
        d = self.root.instances.instance_dir(inst.id)
        (d / LAYERS_FILE).write_text(json.dumps({"lowerdirs": list(layers.lowerdirs),
                                                 "upperdir": layers.upperdir, "workdir": layers.workdir}))
        return {"disk_sources": {}, "console_log": None, "migration_uri": ""}

    def receive_rootfs(self, caller: dict, inst_id: str, stream) -> dict:
        """Unpack a tar stream of the container's upper dir (overlay whiteouts and xattrs
        kept) over what earlier syncs sent."""
        inst = self._incoming(inst_id, self.require_peer(caller))
        if inst.kind != "container":
            raise Unprocessable("only containers take a rootfs stream")
        layers = json.loads((self.config.state_path / "instances" / inst_id / LAYERS_FILE).read_text())
        try:
            return {"bytes": untar_into(layers["upperdir"], stream)}
        except InsufficientResources as e:
            raise InsufficientResources(f"pool {inst.pool!r} on {self.root.host.hostname()} "
                                        f"({self.config.api.listen}) is full: {e.message}") from None

    def receive_disk(self, caller: dict, inst_id: str, stream) -> dict:
        """A stopped VM's root disk (its qcow2 layer, as the source holds it) replaces the
        prepared overlay, pointed at this pool's copy of the same base image."""
        from storage import qemu_img
        inst = self._incoming(inst_id, self.require_peer(caller))
        if inst.kind != "vm":
            raise Unprocessable("only VMs take a disk stream")
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        image = self.root.store.get(inst.image)
        base = self.root.pools[inst.pool].blob_path(vol.base) if vol.base else None
        if not vol.path or (vol.base and not base):
            raise Unsupported(f"pool {inst.pool!r} gives no file path for disks: an offline move needs a "
                              "local pool")
        tmp = os.path.join(os.path.dirname(vol.path), f".incoming-{inst_id}")
        n = 0
        try:
            with open(tmp, "wb") as f:
                try:
                    while chunk := stream.read(IMAGE_CHUNK):
                        n += len(chunk)
                        f.write(chunk)
                    os.fsync(f.fileno())
                except OSError:
                    while stream.read(IMAGE_CHUNK):  # the sender gets our answer, not a reset
                        pass
                    raise
            check_disk_layer(qemu_img.info(tmp, format="qcow2"), image, base)
            if base:  # unsafe: the peer's backing name is replaced, never opened
                qemu_img.rebase(tmp, base, backing_format=image.format, unsafe=True)
            qemu_img.check(tmp, format="qcow2")  # only now: check opens the backing file
            os.chmod(tmp, 0o644)
            os.replace(tmp, vol.path)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InsufficientResources(f"pool {inst.pool!r} on {self.root.host.hostname()} "
                                            f"({self.config.api.listen}) is full: {NO_SPACE.lower()} after "
                                            f"{n // MiB} MiB of the disk") from None
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {"bytes": n}

    def _define_stopped_vm(self, inst: Instance) -> dict:
        spec = {k: v for k, v in inst.spec_dict().items() if k != "image_id"}
        req = models.InstanceCreate.model_validate(spec)
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        seed = str(self.root.instances.instance_dir(inst.id) / "seed.iso")
        try:
            info = self.root.driver.define(self.root.assembly.vm_spec(inst.id, req, vol, seed))
        except BaseException:
            self.root.driver.delete(inst.name)
            raise
        return {"instance": self.root.records.update(inst.id, state=info.state, error=None).to_dict()}

    def _finish_container(self, inst: Instance, start: bool, keep) -> dict:
        from storage.images import RootfsLayers
        layers = json.loads((self.config.state_path / "instances" / inst.id / LAYERS_FILE).read_text())
        if keep is not None:
            prune_rootfs(layers["upperdir"], set(keep))
        spec = {k: v for k, v in inst.spec_dict().items() if k != "image_id"}
        req = models.InstanceCreate.model_validate(spec)
        image = self.root.store.get(inst.image)
        rl = RootfsLayers(tuple(layers["lowerdirs"]), layers["upperdir"], layers["workdir"], None)
        rt = self.root.runtime
        try:
            info = rt.create(self.root.assembly.container_spec(req, image, rl))
            if start:
                info = rt.start(inst.name)
        except BaseException:
            rt.delete(inst.name)
            raise
        return {"instance": self.root.records.update(inst.id, state=info.state, ip=info.ip, error=None).to_dict()}

    def migration_uri(self) -> str:
        hc = self.config.hypervisor
        if hc.migration_uri:
            return hc.migration_uri
        host = self.config.api.listen.rpartition(":")[0].strip("[]")
        return f"qemu+tcp://{host}/system"

    def _ensure_image(self, source: str, want: models.IncomingImage, declared: int | None):
        """This host's copy of image ``want``, pulled from ``source`` if missing: at most the
        size it declared, checked to BE that image (its digest) before anything is imported,
        then imported like any other image (backing and data files refused, layers unpacked
        safely)."""
        from storage import oci
        store = self.root.store
        img = store.find(want.id)
        if img is not None:
            return img
        peer = self.peer(source)
        cache = self.config.state_path / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".migration-image-", dir=cache)
        os.close(fd)
        limit = declared + max(declared // 100, IMAGE_DOWNLOAD_SLACK) if declared else IMAGE_DOWNLOAD_MAX
        try:
            got = peer.download_image(want.id, tmp, limit)
            if want.kind == "container":
                with oci.open_source(tmp) as src:
                    got = src.resolve(None).manifest_digest.removeprefix("sha256:")
            if got != want.id:
                raise Unprocessable(f"image {want.id[:12]} from {source} arrived as {got[:12]}: not the "
                                    "image asked for (corrupted in transfer?); nothing was imported")
            name = want.name if store.find(want.name) is None else f"{want.name}-{want.id[:12]}"
            if want.kind == "vm":
                img = store.import_file(tmp, name=name, format=want.format)
            else:
                img = store.import_oci(tmp, name=name)
        finally:
            os.unlink(tmp)
        return img

    def _clear_stale(self, source: str, inst_id: str, name: str) -> None:
        """A failed earlier attempt from ``source`` may have left an ``incoming`` row: remove it
        (never another peer's)."""
        found = (self.root.records.find_id(inst_id), self.root.records.find_name(name))
        for r in {i.id: i for i in found if i is not None}.values():
            if r.state == INCOMING and self._source_of(r.id) == source:
                with self.root.instances.lock(r.id):
                    self._destroy_incoming(r.id)

    def _source_of(self, inst_id: str) -> str | None:
        """The peer that prepared instance ``inst_id`` here; None for one made here."""
        try:
            return (self.config.state_path / "instances" / inst_id / SOURCE_FILE).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _from(self, inst_id: str, source: str) -> Instance:
        """The instance record ``inst_id`` (by id only) if ``source`` prepared it here; else
        NotFound: a peer sees and touches only what it sent."""
        inst = self.root.records.find_id(inst_id)
        if inst is None or inst.id != inst_id or self._source_of(inst_id) != source:
            raise NotFound(f"no instance {inst_id} came from {source!r} here")
        return inst

    def _incoming(self, inst_id: str, source: str) -> Instance:
        inst = self._from(inst_id, source)
        if inst.state != INCOMING:
            raise Conflict(f"instance {inst.name!r} is {inst.state}, not an incoming migration")
        return inst

    def finish_incoming(self, caller: dict, inst_id: str, resume: bool = True, start: bool = True,
                        keep=None, define: bool = False) -> dict:
        """VM: the guest runs here (``define``: a stopped VM, its disk sent: define it here,
        stopped); container: create (and start) it on the synced rootfs. The record becomes
        the instance's record. Idempotent: an instance this agent adopted already (an earlier
        finish whose answer was lost, or, for a running VM, a restart) is answered as is."""
        source = self.require_peer(caller)
        inst = self._from(inst_id, source)
        if inst.state in ADOPTED_STATES:
            return {"instance": inst.to_dict()}
        inst = self._incoming(inst_id, source)
        with self.root.instances.lock(inst_id):
            if inst.kind == "container":
                return self._finish_container(inst, start, keep)
            if define:
                return self._define_stopped_vm(inst)
            info = self.root.driver.get(inst.name)
            if info.state == "paused" and resume:
                info = self.root.driver.resume(inst.name)
            if info.state not in ("running", "paused"):
                raise Conflict(f"VM {inst.name!r} is {info.state} here: the migration did not complete")
            self._own_shared(inst_id)
            return {"instance": self.root.records.update(inst_id, state=info.state, error=None).to_dict()}

    def _own_shared(self, inst_id: str) -> None:
        """The guest runs here: adopted shared volumes are ours like any other now."""
        (self.config.state_path / "instances" / inst_id / SHARED_FILE).unlink(missing_ok=True)

    def abort_incoming(self, caller: dict, inst_id: str) -> bool:
        """Remove what ``prepare_incoming`` made; False if there was nothing."""
        source = self.require_peer(caller)
        r = self.root.records.find_id(inst_id)
        if r is None:
            return False
        if self._source_of(inst_id) != source:
            raise Conflict(f"instance {inst_id} here did not come from {source!r}: only an incoming migration "
                           "is aborted, by the peer that sent it")
        if r.state != INCOMING:
            raise Conflict(f"instance {inst_id} is {r.state} here: only an incoming migration is aborted")
        with self.root.instances.lock(inst_id):
            return self._destroy_incoming(inst_id)

    def export_image(self, caller: dict, image_id: str):
        """(a generator of the image's bytes, size) for a peer that lacks it: only the image of
        an instance this host is migrating to that peer right now."""
        peer = self.require_peer(caller)
        with self._lock:
            sending = [i for i, dest in self._sending.items() if dest == peer]
        if not any(self.root.instances.get(i).image == image_id for i in sending):
            raise NotFound(f"image {image_id[:12]} is not the image of an instance this host is migrating "
                           f"to {peer!r}")
        img = self.root.store.get(image_id)
        cache = self.config.state_path / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        tmp = str(cache / f".migration-export-{uuid.uuid4().hex}")
        self.root.store.export(img.id, tmp)
        size = os.path.getsize(tmp)
        f = open(tmp, "rb")
        os.unlink(tmp)  # the open file keeps the data until the stream ends

        def chunks():
            with f:
                while chunk := f.read(IMAGE_CHUNK):
                    yield chunk
        return chunks(), size

    def recover(self) -> int:
        """After a restart: an incoming VM that runs here is adopted (the source saw its
        migration succeed); any other incoming leftover is removed."""
        n = 0
        for r in self.root.records.list(states=(INCOMING,)):
            try:
                info = self.root.driver.find(r.name)
                if info is not None and info.state == "running":
                    self._own_shared(r.id)
                    self.root.records.update(r.id, state="running", error=None)
                else:
                    self._destroy_incoming(r.id)
                n += 1
            except Exception as e:  # keep the record: an operator must look
                log.warning("cannot clean up an incoming migration", extra={"instance": r.name,
                                                                           "error": str(e)})
        return n
