"""The storage seam: one ``Backend`` per pool, and the records it hands out.

Terms: a *blob* is immutable content named by its digest (``sha256:<hex>``); a
*volume* is ours by name inside one pool (an instance disk, a container's upper
dir); backend-internal ids (RBD image names, S3 keys, file paths) never leave the
driver except as ``Volume.path``/``Volume.uri``, which is what QEMU or the container
runtime attaches. Lifecycles: blob absent -> put_blob() -> present -> delete_blob();
volume absent -> create_volume()/clone_volume() -> present -> delete_volume().
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Protocol, runtime_checkable

Progress = Callable[[int], None]  # called with the number of bytes done so far

VOLUME_FORMATS = ("qcow2", "raw", "dir")  # dir: a directory (container upper dir)
DISK_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class BlobInfo:
    digest: str  # "sha256:<64 hex>"
    size: int


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int  # virtual size in bytes (a cap for "dir" volumes where the backend can enforce it)
    format: str = "qcow2"


@dataclass(frozen=True)
class Volume:
    name: str
    pool: str
    format: str  # qcow2 | raw | dir
    size: int  # virtual bytes
    base: str | None = None  # digest of the image blob it was cloned from
    path: str | None = None  # a host path (file or dir) when there is one
    uri: str = ""  # file:///..., rbd:<pool>/<image>, nbd://host:port/name
    attach: dict = field(default_factory=dict)  # driver-specific attach facts (rbd monitors, auth)


@dataclass(frozen=True)
class Usage:
    capacity: int  # bytes
    used: int
    available: int


@runtime_checkable
class Backend(Protocol):
    """A storage pool of one kind (``local`` | ``block`` | ``object``).

    Blob half (every backend): content-addressed, verified, atomic; ``put_blob`` of
    content already present stores nothing new. Volume half (``supports_volumes``):
    object pools raise ``Unsupported`` for volume calls.
    """

    name: str
    kind: str
    supports_volumes: bool

    # -- blobs --
    def put_blob(self, src: BinaryIO, *, digest: str | None = None, size: int | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        """Store a stream. If ``digest`` is given and the content differs, raise InvalidInput
        and keep nothing."""

    def open_blob(self, digest: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        """A readable stream of the blob (or of a byte range of it); raises NotFound."""

    def stat_blob(self, digest: str) -> BlobInfo:
        """Raises NotFound."""

    def find_blob(self, digest: str) -> BlobInfo | None: ...

    def delete_blob(self, digest: str) -> bool:
        """Return False if it was already gone."""

    def list_blobs(self) -> list[BlobInfo]: ...

    def blob_path(self, digest: str) -> str | None:
        """A host file holding the blob when the backend has one (local), else None."""

    # -- volumes --
    def create_volume(self, spec: VolumeSpec, source: str | None = None) -> Volume:
        """Create an empty volume, or one filled from the host file ``source`` (converted to
        ``spec.format``). Conflict if the name exists. On failure nothing is left."""

    def clone_volume(self, digest: str, name: str, *, format: str,
                     size: int | None = None) -> Volume:
        """Copy-on-write clone of the disk-image blob ``digest`` (whose format is ``format``),
        O(1) in the image size; grown to ``size`` if larger."""

    def delete_volume(self, name: str) -> bool:
        """Return False if it was already gone."""

    def resize_volume(self, name: str, size: int) -> Volume:
        """Grow only; Unprocessable when shrinking."""

    def get_volume(self, name: str) -> Volume:
        """Raises NotFound."""

    def find_volume(self, name: str) -> Volume | None: ...

    def list_volumes(self) -> list[Volume]: ...

    def usage(self) -> Usage: ...

    def close(self) -> None: ...


@runtime_checkable
class SnapshotsVolumes(Protocol):
    """Pools whose volumes take named point-in-time snapshots of their own (RBD snapshots),
    also while a client (a running VM's QEMU) writes to them: crash-consistent then. A
    volume's snapshots go with delete_volume. ``snapshot`` names: 1-63 letters, digits,
    '-', '_' (InvalidInput otherwise)."""

    def snapshot_volume(self, name: str, snapshot: str) -> None:
        """Conflict if it exists; NotFound for an unknown volume."""

    def rollback_volume(self, name: str, snapshot: str) -> None:
        """The volume's data becomes the snapshot's (which stays). Conflict while a client has
        it open; NotFound if there is no such snapshot."""

    def delete_volume_snapshot(self, name: str, snapshot: str) -> bool:
        """False if there was no such snapshot."""

    def volume_snapshots(self, name: str) -> list[str]: ...


@runtime_checkable
class CopiesVolumeData(Protocol):
    """Pools whose volumes are no host files but whose data qemu-img reads and writes through
    the pool's own URIs (RBD): a backup copies a volume's snapshot (SnapshotsVolumes) out, a
    restore writes a volume's data in."""

    def export_volume_snapshot(self, name: str, snapshot: str, dest: str) -> None:
        """Write the data of ``snapshot`` of volume ``name`` to the new standalone qcow2 file
        ``dest`` (unallocated and zero ranges stay holes). NotFound without that snapshot; on
        failure ``dest`` is removed."""

    def write_volume(self, name: str, src: str, *, src_format: str) -> None:
        """Overwrite volume ``name``'s data with that of the host image ``src`` (the caller
        checked it: no backing or data file but its own), at most the volume's size."""


@runtime_checkable
class SweepsTemp(Protocol):
    """A backend whose in-flight writes leave temp files behind when the agent is killed
    mid-write; ``sweep_temp`` removes those that no write of this process is using and
    that are older than ``before`` (a time.time() value: the agent's start), returning
    (files removed, bytes freed)."""

    def sweep_temp(self, before: float) -> tuple[int, int]: ...


@runtime_checkable
class FetchesBlobs(Protocol):
    """A backend that downloads a whole blob to a host file faster than a stream copy
    (S3: parallel ranged GETs); the image store caches blobs of remote pools with it."""

    def fetch_blob(self, digest: str, dest: str, *, progress: Progress | None = None,
                   writeback: bool = False) -> BlobInfo:
        """Write the blob to ``dest``, verified against its digest (``dest`` appears only
        complete); raises NotFound. ``writeback``: start flushing it to disk early."""


@runtime_checkable
class FetchesObjects(Protocol):
    """An object pool whose other objects (ones some other tool uploaded, named by key)
    can be imported as images."""

    def fetch_object(self, key: str, dest: str, *, sha256: str | None = None,
                     progress: Progress | None = None, writeback: bool = False) -> int:
        """Write object ``key`` to ``dest`` (only complete and, with ``sha256`` hex, verified);
        return its size; raises NotFound."""


@runtime_checkable
class AdoptsBlobs(Protocol):
    """A backend that can take a host file in by a rename: no copy, no second hash."""

    def adopt_blob(self, path: str, digest: str) -> BlobInfo | None:
        """Move ``path``, which the caller verified holds ``digest``, into the pool; None (and
        ``path`` left alone) when it cannot be moved (another filesystem): put_blob it then."""


def iter_chunks(stream: BinaryIO, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    while True:
        data = stream.read(chunk)
        if not data:
            return
        yield data
