"""The ``block`` backend: a Ceph RBD pool through librbd/librados (python3-rbd, python3-rados).

Terms inside the Ceph pool (several agents or other users may share it, so every name we
make carries a prefix and we never touch anything else):

- ``nablob.<hex>``  a blob: its bytes are the image's bytes (size = blob size), with a
  protected snapshot ``base``. Every blob is stored this way, disk image or not: one layout,
  no RADOS object size limit, ranged reads through librbd.
- ``naraw.<hex>``   the raw conversion of a qcow2 blob (made once, on its first clone), with a
  protected snapshot ``base``: RBD clones need raw parents.
- ``navol.<name>``  a volume: an RBD clone of a blob's ``base`` snapshot (O(1)) or a
  standalone image. Volumes are always raw; ``Volume.format`` says so.
  A volume asked for as qcow2 holds a qcow2 inside the RBD image (QEMU opens it as
  driver qcow2 over protocol rbd; QEMU's rbd driver grows the image as the qcow2 grows).
- ``natmp.<host tag>.<uuid>``  work in progress: renamed into place only when complete,
  removed on failure, so no half-made blob or volume is ever visible. A killed agent
  leaves its temps behind: ``sweep_temp`` (storage.backend.SweepsTemp, run by the image
  store's gc at start) removes those of its own host tag (``default_host_tag``: this machine and
  this agent's state dir) made before the agent started; other hosts' temps sharing the
  pool, and untagged ``natmp.<uuid>`` ones of older agents, are left alone.

Deletion policy: ``delete_blob`` refuses with Conflict while volumes are cloned from the
blob (the image store keeps references; flattening would silently copy whole disks).
``delete_volume`` removes the volume's own snapshots with it.

A full pool (quota or cluster full) makes Ceph block writes; we check the pool's full
flag before writing and bound every RADOS op with ``op_timeout`` so nothing hangs.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import uuid
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import timezone
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from agent.errors import (AgentError, CommandFailed, Conflict, InsufficientResources,
                          InvalidInput, NotFound, Unavailable, Unprocessable, Unsupported)
from storage.backend import BlobInfo, Progress, Usage, Volume, VolumeSpec
from storage.validate import parse_digest

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

BLOB_PREFIX = "nablob."
RAW_PREFIX = "naraw."
VOLUME_PREFIX = "navol."
TMP_PREFIX = "natmp."
BASE_SNAP = "base"
SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # a volume snapshot's name (ours: never BASE_SNAP)
META_BASE = "nodeagent.base"  # image metadata: the blob digest a volume was cloned from
META_FORMAT = "nodeagent.format"  # "qcow2" when the image holds a qcow2 (QEMU layers it on rbd)
META_SIZE = "nodeagent.size"  # a qcow2 volume's virtual size (the RBD image is a bit larger)
WRITE_CHUNK = 4 << 20  # 4 MiB = the default RBD object size: one object per write
GROW_STEP = 1 << 30  # a stream of unknown size grows the temp image 1 GiB at a time
CONNECT_TIMEOUT = 15  # seconds to reach the monitors
OP_TIMEOUT = 60  # seconds any single RADOS/mon op may take before we call Ceph unavailable
QEMU_IMG_TIMEOUT = 3600
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")



def default_host_tag(state_dir: str | None = None) -> str:
    """12 hex digits naming this host's temp images in a shared pool: a hash of the
    machine id (else the hostname) and the agent's state dir, stable across restarts and
    distinct for several agents on one machine."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
    except OSError:
        machine = ""
    key = f"{machine or socket.gethostname()}:{os.path.realpath(state_dir or '/')}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _check_volume_name(name: str) -> None:
    if not VOLUME_NAME.match(name or ""):
        raise InvalidInput(f"bad volume name {name!r}: use letters, digits, '.', '_', '-' "
                           "(at most 128, starting with a letter or digit)")


class RbdBackend:
    """A Ceph RBD pool. Connects lazily: a pool whose Ceph is down still constructs, and
    every call then raises Unavailable saying how to reach Ceph."""

    kind = "block"
    supports_volumes = True

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> RbdBackend:
        """agent.registry's uniform construction from ``[pools.<name>]``: ``name`` and the pool's
        options (``pool``, ``conf``, ``user``, ``keyring``, timeouts). Pools keep no rows and touch
        no host network: ``db`` and ``network`` are ignored."""
        return cls(**{"host_tag": default_host_tag(state_dir), **settings})

    def __init__(self, name: str, pool: str, conf: str = "/etc/ceph/ceph.conf",
                 user: str = "admin", keyring: str | None = None,
                 op_timeout: int = OP_TIMEOUT, connect_timeout: int = CONNECT_TIMEOUT,
                 host_tag: str | None = None, **_ignored):
        self.name = name
        self.tmp_prefix = f"{TMP_PREFIX}{host_tag or default_host_tag()}."
        self._writing: set[str] = set()  # temp images this process is writing
        self.pool = pool
        self.conf = conf
        self.user = user
        self.keyring = keyring
        self.op_timeout = int(op_timeout)
        self.connect_timeout = int(connect_timeout)
        self._cluster = None
        self._ioctx = None
        self._del_ioctx = None
        self._readers = weakref.WeakSet()  # open blob streams: closed before the cluster is

    # -- connection and error mapping --
    def _io(self):
        if self._ioctx is not None:
            return self._ioctx
        import rados

        opts = {"rados_osd_op_timeout": str(self.op_timeout),
                "rados_mon_op_timeout": str(self.op_timeout),
                "client_mount_timeout": str(self.connect_timeout)}
        if self.keyring:
            opts["keyring"] = self.keyring
        if not os.path.exists(self.conf):
            raise Unavailable(f"pool {self.name}: Ceph config {self.conf} does not exist: set "
                              "'conf' in the pool's config to the cluster's ceph.conf")
        cluster = rados.Rados(conffile=self.conf, rados_id=self.user, conf=opts)
        try:
            cluster.connect(timeout=self.connect_timeout)
        except rados.Error as e:
            cluster.shutdown()
            raise Unavailable(
                f"pool {self.name}: cannot connect to Ceph ({e}) with conf {self.conf}, user "
                f"client.{self.user}, keyring {self.keyring or '(default)'}: check that the "
                "monitors in mon_host run (scripts/ceph-dev-cluster status) and that the "
                "user and keyring are right") from None
        try:
            ioctx = cluster.open_ioctx(self.pool)
        except rados.ObjectNotFound:
            cluster.shutdown()
            raise Unavailable(f"pool {self.name}: Ceph pool {self.pool!r} does not exist: "
                              f"create it with `ceph osd pool create {self.pool}` and "
                              f"`rbd pool init {self.pool}`") from None
        except rados.Error as e:
            cluster.shutdown()
            raise Unavailable(f"pool {self.name}: cannot open Ceph pool {self.pool!r}: {e}: "
                              f"check client.{self.user}'s caps") from None
        self._cluster, self._ioctx = cluster, ioctx
        return ioctx

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import rados
        import rbd

        try:
            yield
        except AgentError:
            raise
        except (rbd.ImageNotFound, rados.ObjectNotFound):
            raise NotFound(f"pool {self.name}: {what}: not found") from None
        except rbd.ImageExists:
            raise Conflict(f"pool {self.name}: {what}: already exists") from None
        except (rbd.ImageBusy, rbd.ImageHasSnapshots) as e:
            raise Conflict(f"pool {self.name}: {what}: in use ({e})") from None
        except (rbd.Error, rados.Error) as e:
            code = getattr(e, "errno", None)
            if code in (errno.ENOSPC, errno.EDQUOT) or self._pool_full():
                raise self._full_error(what) from None
            if code in (errno.ETIMEDOUT, errno.ENOTCONN, errno.ESHUTDOWN):
                raise Unavailable(f"pool {self.name}: {what}: Ceph did not answer within "
                                  f"{self.op_timeout}s: check the cluster "
                                  "(`ceph -s`, scripts/ceph-dev-cluster status)") from None
            if code in (errno.EACCES, errno.EPERM):
                raise Unavailable(f"pool {self.name}: {what}: permission denied for "
                                  f"client.{self.user}: grant it `osd 'profile rbd "
                                  f"pool={self.pool}'`") from None
            raise CommandFailed(f"pool {self.name}: {what}: {e}") from None

    def _pool_full(self) -> bool:
        """True when the osdmap marks our pool full (quota) or the cluster full."""
        if self._cluster is None:
            return False
        try:
            ret, out, _ = self._cluster.mon_command(
                json.dumps({"prefix": "osd pool ls", "detail": "detail", "format": "json"}),
                b"", timeout=CONNECT_TIMEOUT)
            if ret != 0:
                return False
            for p in json.loads(out):
                if p.get("pool_name") == self.pool:
                    flags = p.get("flags_names", "").split(",")
                    return "full" in flags or "full_quota" in flags
        except Exception:  # noqa: BLE001 - only a hint for the error message
            return False
        return False

    def _full_error(self, what: str) -> InsufficientResources:
        return InsufficientResources(
            f"pool {self.name}: {what}: Ceph pool {self.pool!r} is full: raise its quota with "
            f"`ceph osd pool set-quota {self.pool} max_bytes <bytes>` (Ceph cannot even delete "
            "from a pool at its quota), then delete volumes or images", pool=self.name)

    def _check_room(self, what: str, size: int | None) -> None:
        """Refuse before writing: Ceph would block writes to a full pool."""
        if self._pool_full():
            raise self._full_error(what)
        if size:
            u = self.usage()
            if size > u.available:
                raise InsufficientResources(
                    f"pool {self.name}: {what}: needs {size} bytes but Ceph pool {self.pool!r} "
                    f"has {u.available} available: free space or raise its quota with "
                    f"`ceph osd pool set-quota {self.pool} max_bytes <bytes>`", pool=self.name)

    def _remove_quietly(self, image: str) -> None:
        """Cleanup path: remove an image we made, even from a full pool."""
        import rbd

        ioctx = self._delete_io()
        try:
            with rbd.Image(ioctx, image) as img:
                for s in list(img.list_snaps()):
                    if img.is_protected_snap(s["name"]):
                        img.unprotect_snap(s["name"])
                    img.remove_snap(s["name"])
            rbd.RBD().remove(ioctx, image)
        except rbd.ImageNotFound:
            pass

    def _rbd_spec(self, image: str, snap: str | None = None) -> str:
        """A QEMU rbd: filename (qemu-img / qemu-storage-daemon)."""
        spec = f"rbd:{self.pool}/{image}" + (f"@{snap}" if snap else "")
        spec += f":id={self.user}:conf={self.conf}"
        if self.keyring:
            spec += f":keyring={self.keyring}"
        return spec

    def _names(self) -> list[str]:
        import rbd

        with self._errors("list images"):
            return rbd.RBD().list(self._io())

    # -- blobs --
    def put_blob(self, src: BinaryIO, *, digest: str | None = None, size: int | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        import rbd

        want = parse_digest(digest) if digest else None
        if want and self.find_blob(digest) is not None:
            found = self.stat_blob(digest)
            return found
        ioctx = self._io()
        self._check_room("store a blob", size)
        tmp = made = self._new_temp()
        h = hashlib.sha256()
        done = 0
        try:
            with self._errors("store a blob"):
                rbd.RBD().create(ioctx, tmp, size if size else GROW_STEP)
                with rbd.Image(ioctx, tmp) as img:
                    cap = img.size()
                    while True:
                        data = src.read(WRITE_CHUNK)
                        if not data:
                            break
                        h.update(data)
                        if done + len(data) > cap:
                            cap = max(cap + GROW_STEP, done + len(data))
                            img.resize(cap)
                        img.write(data, done)
                        done += len(data)
                        if progress:
                            progress(done)
                    if size is not None and done != size:
                        raise InvalidInput(f"blob size mismatch: expected {size} bytes, got {done}")
                    got = h.hexdigest()
                    if want and got != want:
                        raise InvalidInput(f"blob digest mismatch: expected sha256:{want}, "
                                           f"content is sha256:{got}")
                    if cap != done:
                        img.resize(done)
                    img.flush()
                final = BLOB_PREFIX + got
                try:
                    rbd.RBD().rename(ioctx, tmp, final)
                except rbd.ImageExists:  # stored meanwhile (or before, when no digest was given)
                    self._remove_quietly(tmp)
                    return BlobInfo(digest=f"sha256:{got}", size=done)
                tmp = None
                self._snapshot_base(final)
        except BaseException:
            if tmp:
                self._remove_quietly(tmp)
            raise
        finally:
            self._writing.discard(made)
        return BlobInfo(digest=f"sha256:{got}", size=done)

    def _snapshot_base(self, image: str) -> None:
        import rbd

        try:
            with rbd.Image(self._io(), image) as img:
                if not img.snap_exists(BASE_SNAP):
                    img.create_snap(BASE_SNAP)
                if not img.is_protected_snap(BASE_SNAP):
                    img.protect_snap(BASE_SNAP)
        except BaseException:
            self._remove_quietly(image)
            raise

    def open_blob(self, digest: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        import rbd

        image = BLOB_PREFIX + parse_digest(digest)
        with self._errors(f"blob {digest}"):
            img = rbd.Image(self._io(), image, snapshot=BASE_SNAP, read_only=True)
        size = img.size()
        if offset < 0 or offset > size:
            img.close()
            raise InvalidInput(f"offset {offset} is outside blob {digest} ({size} bytes)")
        end = size if length is None else min(size, offset + max(0, length))
        reader = _ImageReader(img, offset, end)
        self._readers.add(reader)
        return io.BufferedReader(reader, buffer_size=WRITE_CHUNK)

    def stat_blob(self, digest: str) -> BlobInfo:
        info = self.find_blob(digest)
        if info is None:
            raise NotFound(f"pool {self.name}: blob {digest} not found")
        return info

    def find_blob(self, digest: str) -> BlobInfo | None:
        import rbd

        image = BLOB_PREFIX + parse_digest(digest)
        try:
            with self._errors(f"blob {digest}"):
                with rbd.Image(self._io(), image, snapshot=BASE_SNAP, read_only=True) as img:
                    return BlobInfo(digest=digest, size=img.size())
        except NotFound:
            return None

    def delete_blob(self, digest: str) -> bool:
        import rbd

        hexd = parse_digest(digest)
        ioctx = self._io()
        images = [RAW_PREFIX + hexd, BLOB_PREFIX + hexd]
        with self._errors(f"delete blob {digest}"):
            names = set(rbd.RBD().list(ioctx))
            users = []
            for image in images:
                if image in names:
                    with rbd.Image(ioctx, image) as img:
                        if img.snap_exists(BASE_SNAP):
                            img.set_snap(BASE_SNAP)
                            users += [c[1].removeprefix(VOLUME_PREFIX)
                                      for c in img.list_children()]
            if users:
                raise Conflict(f"pool {self.name}: blob {digest} has volumes cloned from it: "
                               f"{', '.join(sorted(users))}: delete them first")
            existed = False
            for image in images:
                if image in names:
                    self._remove_quietly(image)
                    existed = existed or image.startswith(BLOB_PREFIX)
            return existed

    def list_blobs(self) -> list[BlobInfo]:
        out = []
        for n in self._names():
            if n.startswith(BLOB_PREFIX):
                info = self.find_blob("sha256:" + n[len(BLOB_PREFIX):])
                if info:
                    out.append(info)
        return out

    def blob_path(self, digest: str) -> str | None:
        return None

    # -- volumes --
    def _volume(self, name: str) -> Volume:
        import rbd

        with rbd.Image(self._io(), VOLUME_PREFIX + name, read_only=True) as img:
            meta = dict(img.metadata_list())
            size = img.size()
        base = meta.get(META_BASE)
        fmt = meta.get(META_FORMAT, "raw")
        if fmt == "qcow2":
            size = int(meta.get(META_SIZE, size))
        return Volume(name=name, pool=self.name, format=fmt, size=size, base=base,
                      path=None, uri=f"rbd:{self.pool}/{VOLUME_PREFIX}{name}",
                      attach=self._attach_info(VOLUME_PREFIX + name))

    def _attach_info(self, image: str) -> dict:
        """What QEMU/libvirt need: <disk type='network'><source protocol='rbd'
        name='pool/image'><host name= port=/></source><auth username=...>."""
        monitors = []
        if self._cluster is not None:
            for part in re.split(r"[,\s]+", self._cluster.conf_get("mon_host") or ""):
                for addr in re.findall(r"(?:v[12]:)?([0-9.]+|\[[0-9a-f:]+\]):(\d+)", part):
                    hp = f"{addr[0]}:{addr[1]}"
                    if hp not in monitors:
                        monitors.append(hp)
        return {"protocol": "rbd", "pool": self.pool, "image": image,
                "name": f"{self.pool}/{image}", "monitors": monitors, "user": self.user,
                "conf": self.conf, "keyring": self.keyring, "key": self._key()}

    def _key(self) -> str | None:
        """The user's cephx secret from the keyring file (libvirt needs it as a secret)."""
        if not self.keyring:
            return None
        try:
            section = None
            with open(self.keyring) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("["):
                        section = line.strip("[]")
                    elif section == f"client.{self.user}" and line.startswith("key"):
                        return line.split("=", 1)[1].strip()
        except OSError:
            return None
        return None

    def create_volume(self, spec: VolumeSpec, source: str | None = None) -> Volume:
        """Empty (sparse) or filled from the host file ``source`` (raw or qcow2, converted to
        raw by qemu-img through librbd). Conflict if the name exists; nothing left on failure."""
        import rbd

        _check_volume_name(spec.name)
        if spec.format == "dir":
            raise Unsupported(f"pool {self.name}: a block pool cannot hold a directory volume "
                              "(container upper dirs): use a local pool")
        if spec.format not in ("raw", "qcow2"):
            raise InvalidInput(f"bad volume format {spec.format!r}: use raw or qcow2")
        if spec.size < 0:
            raise InvalidInput(f"bad volume size {spec.size}")
        ioctx = self._io()
        if self.find_volume(spec.name) is not None:
            raise Conflict(f"pool {self.name}: volume {spec.name} already exists")
        self._check_room(f"create volume {spec.name}", None)
        tmp = made = self._new_temp()
        try:
            with self._errors(f"create volume {spec.name}"):
                vsize = spec.size
                if source is not None:
                    vsize = max(spec.size, _virtual_size(source))
                    self._check_room(f"create volume {spec.name}", vsize)
                if spec.format == "raw":
                    if source is None:
                        rbd.RBD().create(ioctx, tmp, vsize)
                    else:
                        _qemu_img(["convert", "-O", "raw", source, self._rbd_spec(tmp)],
                                  self.name)
                        with rbd.Image(ioctx, tmp) as img:
                            if vsize > img.size():
                                img.resize(vsize)
                else:
                    # qemu-img makes the RBD image; QEMU's rbd driver grows it as the qcow2 grows
                    _qemu_img(["create", "-f", "qcow2", self._rbd_spec(tmp), str(vsize)],
                              self.name)
                    if source is not None:
                        _qemu_img(["convert", "-n", "-O", "qcow2", source,
                                   self._rbd_spec(tmp)], self.name)
                    with rbd.Image(ioctx, tmp) as img:
                        img.metadata_set(META_FORMAT, "qcow2")
                        img.metadata_set(META_SIZE, str(vsize))
                try:
                    rbd.RBD().rename(ioctx, tmp, VOLUME_PREFIX + spec.name)
                except rbd.ImageExists:
                    raise Conflict(f"pool {self.name}: volume {spec.name} already exists") from None
                tmp = None
        finally:
            self._writing.discard(made)
            if tmp:
                self._remove_quietly(tmp)
        return self.get_volume(spec.name)

    def _raw_parent(self, digest: str, format: str) -> str:
        """The image whose ``base`` snapshot volumes of this blob are cloned from."""
        import rbd

        hexd = parse_digest(digest)
        blob = BLOB_PREFIX + hexd
        if format == "raw":
            return blob
        if format != "qcow2":
            raise Unprocessable(f"cannot clone blob {digest} of format {format!r}: "
                                "RBD clones need raw or qcow2 disk images")
        raw = RAW_PREFIX + hexd
        ioctx = self._io()
        names = set(rbd.RBD().list(ioctx))
        if raw in names:
            return raw
        if blob not in names:
            raise NotFound(f"pool {self.name}: blob {digest} not found")
        self._check_room(f"convert blob {digest} to raw", None)
        tmp = made = self._new_temp()
        try:
            _qemu_img(["convert", "-f", "qcow2", "-O", "raw", self._rbd_spec(blob, BASE_SNAP),
                       self._rbd_spec(tmp)], self.name)
            try:
                rbd.RBD().rename(ioctx, tmp, raw)
            except rbd.ImageExists:  # converted meanwhile by another caller
                return raw
            tmp = None
            self._snapshot_base(raw)
        finally:
            self._writing.discard(made)
            if tmp:
                self._remove_quietly(tmp)
        return raw

    def clone_volume(self, digest: str, name: str, *, format: str,
                     size: int | None = None) -> Volume:
        """An RBD clone of the blob's protected snapshot: O(1). A qcow2 blob is converted to
        a raw parent once (on its first clone); later clones are O(1) too."""
        import rbd

        _check_volume_name(name)
        ioctx = self._io()
        with self._errors(f"clone blob {digest} to volume {name}"):
            parent = self._raw_parent(digest, format)
            self._check_room(f"clone volume {name}", None)
            target = VOLUME_PREFIX + name
            try:
                rbd.RBD().clone(ioctx, parent, BASE_SNAP, ioctx, target)
            except rbd.ImageExists:
                raise Conflict(f"pool {self.name}: volume {name} already exists") from None
            try:
                with rbd.Image(ioctx, target) as img:
                    img.metadata_set(META_BASE, digest)
                    if size and size > img.size():
                        img.resize(size)
            except BaseException:
                self._remove_quietly(target)
                raise
        return self.get_volume(name)

    def delete_volume(self, name: str) -> bool:
        """Remove the volume and its own snapshots. Conflict while a client (VM, NBD export)
        has it open; InsufficientResources in a pool at its quota (librbd cannot remove
        there: raise the quota first)."""
        import rbd

        _check_volume_name(name)
        ioctx = self._delete_io()
        image = VOLUME_PREFIX + name
        with self._errors(f"delete volume {name}"):
            try:
                with rbd.Image(ioctx, image, read_only=True) as img:
                    snaps = list(img.list_snaps())
                if snaps:
                    with rbd.Image(ioctx, image) as img:
                        for s in snaps:
                            if img.is_protected_snap(s["name"]):
                                img.set_snap(s["name"])
                                kids = list(img.list_children())
                                img.set_snap(None)
                                if kids:
                                    raise Conflict(f"pool {self.name}: volume {name} has "
                                                   f"clones {kids}: delete them first")
                                img.unprotect_snap(s["name"])
                            img.remove_snap(s["name"])
                try:
                    rbd.RBD().remove(ioctx, image)
                except rbd.ImageNotFound:
                    if image in rbd.RBD().list(ioctx):  # librbd says ENOENT in a full pool
                        raise self._full_error(f"delete volume {name}") if self._pool_full() \
                            else CommandFailed(f"pool {self.name}: delete volume {name} failed")
                    return False
            except rbd.ImageNotFound:
                return False
            except rbd.ImageBusy:
                raise Conflict(f"pool {self.name}: volume {name} is open by a client (a running "
                               "VM or an NBD export): stop it first") from None
            return True

    # -- volume snapshots (storage.backend.SnapshotsVolumes) --
    def _snap_args(self, name: str, snapshot: str) -> str:
        _check_volume_name(name)
        if not isinstance(snapshot, str) or not SNAPSHOT_RE.fullmatch(snapshot) or snapshot == BASE_SNAP:
            raise InvalidInput(f"bad snapshot name {str(snapshot)[:80]!r}: 1-63 letters, digits, '-', '_' "
                               f"(not {BASE_SNAP!r})")
        return VOLUME_PREFIX + name

    def snapshot_volume(self, name: str, snapshot: str) -> None:
        """An RBD snapshot of the volume; librbd asks a client holding the image's exclusive
        lock (a running VM's QEMU) to take it, so writes in flight land before or after it."""
        import rbd
        image = self._snap_args(name, snapshot)
        self._check_room(f"snapshot volume {name}", None)
        with self._errors(f"snapshot {snapshot} of volume {name}"):
            with rbd.Image(self._io(), image) as img:
                if any(s["name"] == snapshot for s in img.list_snaps()):
                    raise Conflict(f"pool {self.name}: volume {name} already has a snapshot {snapshot!r}")
                img.create_snap(snapshot)

    def rollback_volume(self, name: str, snapshot: str) -> None:
        import rbd
        image = self._snap_args(name, snapshot)
        with self._errors(f"roll volume {name} back to {snapshot}"):
            with rbd.Image(self._io(), image) as img:
                if not any(s["name"] == snapshot for s in img.list_snaps()):
                    raise NotFound(f"pool {self.name}: volume {name} has no snapshot {snapshot!r}")
                if len(list(img.watchers_list())) > 1:  # this handle is one watcher; another is a client
                    raise Conflict(f"pool {self.name}: volume {name} is open by a client (a running VM): "
                                   "stop it first")
                img.rollback_to_snap(snapshot)

    def delete_volume_snapshot(self, name: str, snapshot: str) -> bool:
        import rbd
        image = self._snap_args(name, snapshot)
        with self._errors(f"delete snapshot {snapshot} of volume {name}"):
            with rbd.Image(self._delete_io(), image) as img:
                if not any(s["name"] == snapshot for s in img.list_snaps()):
                    return False
                img.remove_snap(snapshot)
                return True

    def volume_snapshots(self, name: str) -> list[str]:
        import rbd
        image = VOLUME_PREFIX + name
        _check_volume_name(name)
        with self._errors(f"snapshots of volume {name}"):
            with rbd.Image(self._io(), image, read_only=True) as img:
                return sorted(s["name"] for s in img.list_snaps() if s["name"] != BASE_SNAP)

    # -- data in and out through qemu-img (storage.backend.CopiesVolumeData) --
    def export_volume_snapshot(self, name: str, snapshot: str, dest: str) -> None:
        image = self._snap_args(name, snapshot)
        if snapshot not in self.volume_snapshots(name):
            raise NotFound(f"pool {self.name}: volume {name} has no snapshot {snapshot!r}")
        fmt = self.get_volume(name).format
        try:
            _qemu_img(["convert", "-f", fmt, "-O", "qcow2", self._rbd_spec(image, snapshot), dest], self.name)
        except BaseException:
            if os.path.exists(dest):
                os.unlink(dest)
            raise

    def write_volume(self, name: str, src: str, *, src_format: str) -> None:
        _check_volume_name(name)
        vol = self.get_volume(name)
        _qemu_img(["convert", "-n", "-f", src_format, "-O", vol.format, src,
                   self._rbd_spec(VOLUME_PREFIX + name)], self.name)

    def _delete_io(self):
        """An ioctx whose ops go through even when the pool is full (FULL_TRY)."""
        if self._del_ioctx is None:
            self._io()
            ioctx = self._cluster.open_ioctx(self.pool)
            ioctx.set_osdmap_full_try()
            self._del_ioctx = ioctx
        return self._del_ioctx

    def resize_volume(self, name: str, size: int) -> Volume:
        import rbd

        vol = self.get_volume(name)
        if size < vol.size:
            raise Unprocessable(f"pool {self.name}: volume {name} is {vol.size} bytes; "
                                f"shrinking to {size} is not supported (grow only)")
        if size == vol.size:
            return vol
        self._check_room(f"resize volume {name}", None)
        image = VOLUME_PREFIX + name
        with self._errors(f"resize volume {name}"):
            if vol.format == "raw":
                with rbd.Image(self._io(), image) as img:
                    img.resize(size)
            else:
                _qemu_img(["resize", "-f", "qcow2", self._rbd_spec(image), str(size)], self.name)
                with rbd.Image(self._io(), image) as img:
                    img.metadata_set(META_SIZE, str(size))
        return self.get_volume(name)

    def get_volume(self, name: str) -> Volume:
        v = self.find_volume(name)
        if v is None:
            raise NotFound(f"pool {self.name}: volume {name} not found")
        return v

    def find_volume(self, name: str) -> Volume | None:
        import rbd

        _check_volume_name(name)
        try:
            with self._errors(f"volume {name}"):
                return self._volume(name)
        except NotFound:
            return None
        except rbd.ImageNotFound:
            return None

    def list_volumes(self) -> list[Volume]:
        out = []
        for n in sorted(self._names()):
            if n.startswith(VOLUME_PREFIX):
                v = self.find_volume(n[len(VOLUME_PREFIX):])
                if v:
                    out.append(v)
        return out

    def usage(self) -> Usage:
        """capacity: the pool's quota if set, else the cluster's raw size; used: the pool's
        stored bytes; available: what is left of both."""
        ioctx = self._io()
        with self._errors("usage"):
            cl = self._cluster.get_cluster_stats()
            used = int(ioctx.get_stats()["num_bytes"])
            cluster_cap, cluster_avail = cl["kb"] * 1024, cl["kb_avail"] * 1024
            ret, out, _ = self._cluster.mon_command(
                json.dumps({"prefix": "osd pool get-quota", "pool": self.pool,
                            "format": "json"}), b"", timeout=CONNECT_TIMEOUT)
            quota = json.loads(out).get("quota_max_bytes", 0) if ret == 0 else 0
        if quota:
            return Usage(capacity=quota, used=used,
                         available=max(0, min(quota - used, cluster_avail)))
        return Usage(capacity=cluster_cap, used=used, available=cluster_avail)

    def _new_temp(self) -> str:
        """A temp image name of this host; the caller discards it from _writing when done."""
        name = self.tmp_prefix + uuid.uuid4().hex
        self._writing.add(name)
        return name

    def sweep_temp(self, before: float) -> tuple[int, int]:
        """Remove the temp images a killed agent of this host left: ``natmp.<our host
        tag>.*`` created before ``before`` (this agent's start) that no write of this
        process is using. Returns (images removed, their provisioned bytes)."""
        import rbd

        n = freed = 0
        with self._errors("sweep temp images"):
            ioctx = self._io()
            for name in self._names():
                if not name.startswith(self.tmp_prefix) or name in self._writing:
                    continue
                try:
                    with rbd.Image(ioctx, name, read_only=True) as img:
                        created = img.create_timestamp().replace(tzinfo=timezone.utc).timestamp()
                        size = img.size()
                except rbd.ImageNotFound:  # finished or removed meanwhile
                    continue
                if created >= before:
                    continue
                self._remove_quietly(name)
                n, freed = n + 1, freed + size
        return n, freed

    def close(self) -> None:
        """Close open blob streams, then the connection (an rbd.Image outliving its
        cluster handle would crash the process)."""
        for reader in list(self._readers):
            reader.close()
        if self._del_ioctx is not None:
            self._del_ioctx.close()
            self._del_ioctx = None
        if self._ioctx is not None:
            self._ioctx.close()
            self._ioctx = None
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None


class _ImageReader(io.RawIOBase):
    """A read-only byte range [pos, end) of an open rbd.Image; closes the image."""

    def __init__(self, img, pos: int, end: int):
        self._img, self._pos, self._end = img, pos, end

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._end - self._pos)
        if n <= 0:
            return 0
        data = self._img.read(self._pos, n)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._img.close()
        super().close()


def _virtual_size(path: str) -> int:
    if not os.path.isfile(path):
        raise InvalidInput(f"source {path} is not a file")
    out = _qemu_img(["info", "--output=json", path], None)
    try:
        info = json.loads(out)
    except ValueError:
        raise InvalidInput(f"source {path}: qemu-img cannot read it") from None
    if info.get("format") not in ("raw", "qcow2"):
        raise Unprocessable(f"source {path} is {info.get('format')!r}; use a raw or qcow2 image")
    if info.get("backing-filename"):
        raise Unprocessable(f"source {path} has a backing file ({info['backing-filename']}): "
                            "flatten it first with `qemu-img convert`")
    return int(info["virtual-size"])


def _qemu_img(args: list[str], pool: str | None) -> str:
    argv = ["qemu-img", *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except FileNotFoundError:
        raise Unavailable("qemu-img is missing: apt-get install -y qemu-utils") from None
    if p.returncode != 0:
        if "Unknown protocol 'rbd'" in p.stderr or "Unknown driver 'rbd'" in p.stderr:
            raise Unavailable("qemu-img lacks RBD support: apt-get install -y qemu-block-extra")
        raise CommandFailed(f"{'pool ' + pool + ': ' if pool else ''}qemu-img {args[0]} failed: "
                            f"{p.stderr.strip()[-500:]}", argv=argv, returncode=p.returncode,
                            stderr=p.stderr)
    return p.stdout
