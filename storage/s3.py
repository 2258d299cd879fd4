"""The ``object`` backend: blobs as objects in one S3 bucket (radosgw here; AWS, MinIO or any
S3 elsewhere) through boto3. Blob-only: volume calls raise Unsupported (instance disks are
fetched into a local or block pool, which caches them).

Layout: ``sha256/<hex>`` holds a blob, with user metadata ``sha256=<hex>``. Uploads of a
known digest go straight to their key; uploads of unknown content are hashed on the way up
to ``tmp/<uuid>`` and copied into place (server side) once the digest is known (a file
over 5 GiB, too big for one CopyObject, is hashed before its upload instead). An object appears only when
complete: a multipart upload is completed only after every part succeeded and the sha256
of the stream matched; on any failure it is aborted (no object, no dangling upload).
Downloads of a whole blob are hashed as they stream and raise InvalidInput on mismatch.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ThreadPoolExecutor, wait
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.errors import (AgentError, CommandFailed, InsufficientResources, InvalidInput,
                          NotFound, Unavailable, Unsupported)
from storage.backend import BlobInfo, Progress, Usage
from storage.validate import HEX, parse_digest

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

BLOB_PREFIX = "sha256/"
TMP_PREFIX = "tmp/"
MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum parts per upload
DEFAULT_PART_SIZE = 16 << 20  # as fast here as 32 or 64 MiB, with a quarter of the buffers
DEFAULT_CONCURRENCY = 8
NOMINAL_CAPACITY = 1 << 50  # 1 PiB: S3 has no capacity to ask for; object stores grow
CONNECT_TIMEOUT = 10  # seconds
READ_TIMEOUT = 120
READ_CHUNK = 1 << 20
COPY_OBJECT_MAX = 5 << 30  # S3's limit for a single CopyObject
FETCH_RANGE = 8 << 20  # smallest download segment; writeback is started per this many bytes
FETCH_CHUNK = 1 << 20  # one read of a download stream: hashed while cache-hot
WRITE_AHEAD = 4  # chunks of a download stream between its reader and its writer
DEFAULT_FETCH_STREAMS = 1  # one GET stream: fastest here (radosgw on the host, 2 cores); raise
# it for stores where one connection is slow (AWS S3: 4-8)



class S3Backend:
    """An S3 bucket as a blob pool. Nothing connects at construction; every call maps
    connection, credential and bucket errors to Unavailable with the fix."""

    kind = "object"
    supports_volumes = False

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> S3Backend:
        """agent.registry's uniform construction from ``[pools.<name>]``: ``name`` and the pool's
        options (``endpoint``, ``bucket``, keys, tuning); blobs live in the bucket. Pools keep no
        rows and touch no host network: ``db`` and ``network`` are ignored."""
        return cls(**settings)

    def __init__(self, name: str, endpoint: str, bucket: str, access_key: str, secret_key: str,
                 region: str = "us-east-1", part_size: int = DEFAULT_PART_SIZE,
                 concurrency: int = DEFAULT_CONCURRENCY, fetch_streams: int = DEFAULT_FETCH_STREAMS,
                 sign_payload: bool = False, verify: bool = True, **_ignored):
        if int(part_size) < MIN_PART_SIZE:
            raise InvalidInput(f"pool {name}: part_size {part_size} is below S3's minimum "
                               f"{MIN_PART_SIZE} (5 MiB)")
        if int(concurrency) < 1 or int(fetch_streams) < 1:
            raise InvalidInput(f"pool {name}: concurrency and fetch_streams must be at least 1")
        self.name = name
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.part_size = int(part_size)
        self.concurrency = int(concurrency)
        self.fetch_streams = int(fetch_streams)
        self._access_key, self._secret_key = access_key, secret_key
        self.verify = verify
        self.sign_payload = bool(sign_payload)
        self._client = None
        self._lock = threading.Lock()

    # -- client and error mapping --
    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint, region_name=self.region,
                    aws_access_key_id=self._access_key, aws_secret_access_key=self._secret_key,
                    verify=self.verify,
                    config=Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                                  retries={"max_attempts": 3, "mode": "standard"},
                                  max_pool_connections=max(self.concurrency, self.fetch_streams) + 2,
                                  # signing a part's body hashes it a second time: our sha256
                                  # of the whole stream, checked on every download, is the
                                  # integrity check (sign_payload = true adds it back)
                                  s3={"addressing_style": "path",
                                      "payload_signing_enabled": self.sign_payload},
                                  # whole-stream sha256 is ours; older S3s (radosgw 16)
                                  # reject the newer flexible checksums
                                  request_checksum_calculation="when_required",
                                  response_checksum_validation="when_required"))
            return self._client

    def _error(self, e: Exception, what: str) -> AgentError:
        from botocore.exceptions import (ClientError, ConnectionError, EndpointConnectionError,
                                         NoCredentialsError, ReadTimeoutError)

        if isinstance(e, AgentError):
            return e
        where = f"pool {self.name} (S3 {self.endpoint}, bucket {self.bucket})"
        if isinstance(e, (EndpointConnectionError, ConnectionError, ReadTimeoutError)):
            return Unavailable(f"{where}: {what}: S3 is unreachable ({e}): check that the "
                               "endpoint is right and the service runs")
        if isinstance(e, NoCredentialsError):
            return Unavailable(f"{where}: {what}: no credentials: set access_key and "
                               "secret_key in the pool's config")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",):
                return Unavailable(f"{where}: {what}: bucket {self.bucket!r} does not exist: "
                                   "create it (e.g. `aws s3 mb s3://BUCKET`) or fix 'bucket' "
                                   "in the pool's config")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or \
                    status in (401, 403):
                return Unavailable(f"{where}: {what}: S3 refused the credentials ({code}): "
                                   "fix access_key/secret_key in the pool's config")
            if code in ("QuotaExceeded", "EntityTooLarge") or status == 507:
                return InsufficientResources(f"{where}: {what}: the bucket is full ({code}): "
                                             "free space or raise its quota", pool=self.name)
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return NotFound(f"{where}: {what}: not found")
            return CommandFailed(f"{where}: {what}: S3 error {code}: {e}")
        return CommandFailed(f"{where}: {what}: {e}")

    def _key(self, digest: str) -> str:
        return BLOB_PREFIX + parse_digest(digest)

    # -- blobs --
    def put_blob(self, src: BinaryIO, *, digest: str | None = None, size: int | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        want = parse_digest(digest) if digest else None
        if want is None and _seekable(src) and _remaining(src) > COPY_OBJECT_MAX:
            # too big for one server-side copy: hash the file first (one local read)
            # rather than upload it under a temporary key and copy it part by part
            want = _hash_rest(src)
            digest = "sha256:" + want
        if want:
            found = self.find_blob(digest)
            if found is not None:
                return found
        key = BLOB_PREFIX + want if want else TMP_PREFIX + uuid.uuid4().hex
        try:
            got, done = self._upload(src, key, want, size, progress)
        except Exception as e:
            raise self._error(e, "upload a blob") from None
        final = f"sha256:{got}"
        if key.startswith(BLOB_PREFIX):
            return BlobInfo(digest=final, size=done)
        try:  # unknown content, hashed on the way up: now that it has a name, copy it into place
            if self.find_blob(final) is None:
                self._copy(key, BLOB_PREFIX + got, done, {"sha256": got})
        except Exception as e:
            raise self._error(e, "store a blob") from None
        finally:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception:  # noqa: BLE001 - the error above (if any) is the one to report
                pass
        return BlobInfo(digest=final, size=done)

    def _copy(self, src_key: str, key: str, size: int, metadata: dict) -> None:
        """Server-side copy: one CopyObject up to 5 GiB (radosgw shares the data instead of
        copying it), else boto3's part-by-part managed copy."""
        source = {"Bucket": self.bucket, "Key": src_key}
        if size <= COPY_OBJECT_MAX:
            self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=key,
                                    Metadata=metadata, MetadataDirective="REPLACE")
        else:
            self.client.copy(source, self.bucket, key,
                             ExtraArgs={"Metadata": metadata, "MetadataDirective": "REPLACE"})

    def _upload(self, src: BinaryIO, key: str, want: str | None, size: int | None,
                progress: Progress | None) -> tuple[str, int]:
        """Upload ``src`` to ``key``; return (sha256 hex, bytes). Parts are read in order
        (hashing as we go) into reused buffers (at most ``concurrency`` + 1) and sent by
        ``concurrency`` threads. The object becomes visible only when the digest matched."""
        part_size = self.part_size
        if size is not None and size > part_size * MAX_PARTS:
            part_size = -(-size // MAX_PARTS)
        h = hashlib.sha256()
        free: queue.Queue = queue.Queue()  # part buffers, made as needed and reused
        made = 0

        def read() -> tuple[bytearray, int]:
            nonlocal made
            if free.empty() and made <= self.concurrency:  # one per sender + the one being read
                made += 1
                free.put(bytearray(part_size))
            buf = free.get()
            with memoryview(buf) as view:
                n = _read_full(src, view)
                h.update(view[:n])
            return buf, n

        def body(buf: bytearray, n: int) -> bytearray:
            return buf if n == len(buf) else buf[:n]  # botocore takes bytes or bytearray

        buf, n = read()
        meta = {"sha256": want} if want else {}
        if n < part_size:  # one request
            got = h.hexdigest()
            self._check(want, got, size, n)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body(buf, n),
                                   Metadata={"sha256": got})
            if progress:
                progress(n)
            return got, n
        c = self.client
        upload_id = c.create_multipart_upload(Bucket=self.bucket, Key=key,
                                              Metadata=meta)["UploadId"]
        done = 0
        parts: dict[int, str] = {}
        lock = threading.Lock()

        def send(number: int, buf: bytearray, n: int) -> None:
            nonlocal done
            try:
                r = c.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                  PartNumber=number, Body=body(buf, n))
            finally:
                free.put(buf)
            with lock:
                parts[number] = r["ETag"]
                done += n
                if progress:
                    progress(done)

        try:
            with ThreadPoolExecutor(max_workers=self.concurrency,
                                    thread_name_prefix=f"s3-{self.name}") as pool:
                pending = set()
                number, total = 1, 0
                while n:
                    total += n
                    if len(pending) >= self.concurrency:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            f.result()
                    pending.add(pool.submit(send, number, buf, n))
                    buf, n = read()
                    number += 1
                for f in pending:
                    f.result()
            got = h.hexdigest()
            self._check(want, got, size, total)
            c.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]}
                                           for n in sorted(parts)]})
            return got, total
        except BaseException:
            try:
                c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001
                pass
            raise

    @staticmethod
    def _check(want: str | None, got: str, size: int | None, done: int) -> None:
        if size is not None and size != done:
            raise InvalidInput(f"blob size mismatch: expected {size} bytes, got {done}")
        if want and want != got:
            raise InvalidInput(f"blob digest mismatch: expected sha256:{want}, content is "
                               f"sha256:{got}")

    def open_blob(self, digest: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        key = self._key(digest)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInput(f"bad range offset={offset} length={length}")
        whole = offset == 0 and length is None
        kwargs = {}
        if not whole:
            if length == 0:
                self.stat_blob(digest)
                return io.BytesIO(b"")
            end = "" if length is None else str(offset + length - 1)
            kwargs["Range"] = f"bytes={offset}-{end}"
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key, **kwargs)
        except Exception as e:
            from botocore.exceptions import ClientError
            if isinstance(e, ClientError) and \
                    e.response.get("Error", {}).get("Code") == "InvalidRange":
                info = self.stat_blob(digest)
                if offset >= info.size:
                    return io.BytesIO(b"")
            raise self._error(e, f"read blob {digest}") from None
        body = r["Body"]
        if not whole:
            return io.BufferedReader(_BodyReader(body, None, digest), buffer_size=READ_CHUNK)
        return io.BufferedReader(_BodyReader(body, parse_digest(digest), digest), buffer_size=READ_CHUNK)

    def fetch_blob(self, digest: str, dest: str, *, progress: Progress | None = None,
                   writeback: bool = False) -> BlobInfo:
        """Download the whole blob to the host file ``dest`` (an addition to the Backend
        seam for caching images on a host), verified against its digest."""
        size = self.fetch_object(self._key(digest), dest, sha256=parse_digest(digest), progress=progress,
                                 writeback=writeback)
        return BlobInfo(digest=digest, size=size)

    def fetch_object(self, key: str, dest: str, *, sha256: str | None = None,
                     progress: Progress | None = None, writeback: bool = False) -> int:
        """Download the object ``key`` (any object of the bucket: an image another tool put
        there) to the host file ``dest``; returns its size. ``fetch_streams`` ranged GETs
        (contiguous segments, one stream each) read into a ring of reused buffers that a
        writer thread writes in place; the sha256 is taken in order, while each chunk is
        still in the CPU cache where it can be (the stream at the hash position), else read
        back from the page cache.
        ``dest`` appears only complete and, when ``sha256`` (hex) is given, verified
        (written to a temp file beside it, then renamed). ``writeback``: the caller will
        make ``dest`` durable (fsync), so its chunks start going to disk as they arrive."""
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except Exception as e:
            raise self._error(e, f"object {key!r}") from None
        tmp = f"{dest}.part-{uuid.uuid4().hex[:8]}"
        streams = max(1, min(self.fetch_streams, size // FETCH_RANGE))
        step = max(1, -(-size // streams))
        segments = [(o, min(step, size - o)) for o in range(0, size, step)]  # none if empty
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                hasher = _OrderedHash(fd, progress, hashing=bool(sha256))

                def segment(offset: int, n: int) -> None:
                    try:
                        got = self._stream_range(key, fd, offset, n, size, hasher, writeback)
                        if got != n:
                            raise InvalidInput(f"object {key!r}: short read at {offset + got}")
                    except BaseException:
                        hasher.stopped = True  # the other streams stop at their next chunk
                        raise

                if len(segments) <= 1:
                    for o, n in segments:
                        segment(o, n)
                else:
                    with ThreadPoolExecutor(max_workers=len(segments),
                                            thread_name_prefix=f"s3-{self.name}") as pool:
                        futures = [pool.submit(segment, o, n) for o, n in segments]
                        wait(futures, return_when=FIRST_EXCEPTION)
                    errors = [f.exception() for f in futures if f.exception() is not None]
                    if errors:  # the one that stopped the others
                        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
                hasher.catch_up(size)
            finally:
                os.close(fd)
            if sha256 and hasher.hexdigest() != sha256:
                got = hasher.hexdigest()
                if key == BLOB_PREFIX + sha256:
                    raise InvalidInput(f"blob sha256:{sha256} is corrupt in S3: its content is "
                                       f"sha256:{got}: delete it and import it again")
                raise InvalidInput(f"object {key!r} in pool {self.name} has sha256:{got}, "
                                   f"not the expected sha256:{sha256}: check the key and the digest")
            os.replace(tmp, dest)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, Exception):
                raise self._error(e, f"fetch object {key!r}") from None
            raise
        return size

    def _stream_range(self, key: str, fd: int, offset: int, n: int, size: int,
                      hasher: "_OrderedHash", writeback: bool) -> int:
        """GET bytes [offset, offset+n) of ``key`` as one stream: each chunk is read into a
        buffer of a small ring, offered to ``hasher`` and written in place by a writer
        thread (the next chunk arrives while the last one goes to the page cache). Returns
        the bytes got."""
        extra = {"Range": f"bytes={offset}-{offset + n - 1}"} if n != size else {}
        body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
        chunk_size = min(FETCH_CHUNK, n)
        free: queue.Queue = queue.Queue()
        for _ in range(WRITE_AHEAD):
            free.put(memoryview(bytearray(chunk_size)))
        full: queue.Queue = queue.Queue()
        failed: list[BaseException] = []

        def write() -> None:
            while (item := full.get()) is not None:
                buf, at, k = item
                try:
                    if not failed:
                        _pwrite_all(fd, buf[:k], at)
                        end = at + k - offset
                        if writeback and end % FETCH_RANGE < k:  # start the disk write of what is done
                            os.posix_fadvise(fd, at + k - end % FETCH_RANGE - FETCH_RANGE, FETCH_RANGE,
                                             os.POSIX_FADV_DONTNEED)
                except BaseException as e:
                    failed.append(e)
                free.put(buf)
                full.task_done()

        writer = threading.Thread(target=write, name=f"s3-{self.name}-write", daemon=True)
        writer.start()
        readinto, done = _readinto(body), 0
        try:
            with body:
                while done < n and not failed:
                    buf = free.get()
                    k = readinto(buf[:min(chunk_size, n - done)])
                    if not k:
                        free.put(buf)
                        break
                    hasher.offer(buf[:k], offset + done, offset, flush=full.join)
                    full.put((buf, offset + done, k))
                    done += k
                if done == n:  # else closing the body drops its connection: no draining the rest
                    _drain(body)
        finally:
            full.put(None)
            writer.join()
        if failed:
            raise failed[0]
        return done

    def stat_blob(self, digest: str) -> BlobInfo:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except Exception as e:
            raise self._error(e, f"blob {digest}") from None
        return BlobInfo(digest=digest, size=int(r["ContentLength"]))

    def find_blob(self, digest: str) -> BlobInfo | None:
        try:
            return self.stat_blob(digest)
        except NotFound:
            return None

    def delete_blob(self, digest: str) -> bool:
        if self.find_blob(digest) is None:
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))
        except Exception as e:
            raise self._error(e, f"delete blob {digest}") from None
        return True

    def list_blobs(self) -> list[BlobInfo]:
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=BLOB_PREFIX):
                for o in page.get("Contents", []):
                    hexd = o["Key"][len(BLOB_PREFIX):]
                    if len(hexd) == 64 and HEX.issuperset(hexd):
                        out.append(BlobInfo(digest="sha256:" + hexd, size=int(o["Size"])))
        except Exception as e:
            raise self._error(e, "list blobs") from None
        return out

    def blob_path(self, digest: str) -> str | None:
        return None

    # -- objects by key (storage.backups keeps backup artifacts under backups/) --
    def put_object(self, key: str, src: BinaryIO, *, progress: Progress | None = None) -> tuple[str, int]:
        """Upload ``src`` to ``key`` (multipart past one part: visible only once complete, aborted
        on failure); its (sha256 hex, size)."""
        try:
            return self._upload(src, key, None, None, progress)
        except Exception as e:
            raise self._error(e, f"upload object {key!r}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as e:
            raise self._error(e, f"write object {key!r}") from None

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        """The object ``key`` (at most ``limit`` bytes read), None if there is none."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with body:
                return body.read(limit)
        except Exception as e:
            err = self._error(e, f"read object {key!r}")
            if isinstance(err, NotFound):
                return None
            raise err from None

    def open_object(self, key: str) -> tuple[BinaryIO, int]:
        """A stream of the object ``key`` and its size; NotFound."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            raise self._error(e, f"object {key!r}") from None
        return io.BufferedReader(_BodyReader(r["Body"], None, key), READ_CHUNK), int(r["ContentLength"])

    def list_keys(self, prefix: str) -> list[str]:
        try:
            return [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", [])]
        except Exception as e:
            raise self._error(e, f"list {prefix!r}") from None

    def delete_key(self, key: str) -> bool:
        """Delete object ``key``; False if there was none."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if isinstance(self._error(e, key), NotFound):
                return False
            raise self._error(e, f"object {key!r}") from None
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            raise self._error(e, f"delete object {key!r}") from None
        return True

    def abort_uploads(self, key: str) -> int:
        """Abort the unfinished multipart uploads to ``key`` (a killed agent's); how many."""
        n = 0
        try:
            r = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            for u in r.get("Uploads", []):
                if u["Key"] == key:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=u["UploadId"])
                    n += 1
        except Exception as e:
            raise self._error(e, f"abort uploads to {key!r}") from None
        return n

    # -- volumes: not on an object pool --
    def _no_volumes(self, *_a, **_k):
        raise Unsupported(f"pool {self.name} is an object pool (S3): it holds images only; "
                          "put volumes on a local or block pool")

    create_volume = clone_volume = delete_volume = resize_volume = _no_volumes
    get_volume = find_volume = list_volumes = _no_volumes

    def usage(self) -> Usage:
        """S3 reports no capacity: capacity is nominal (NOMINAL_CAPACITY), used is the sum of
        the blobs' sizes."""
        used = sum(b.size for b in self.list_blobs())
        return Usage(capacity=max(NOMINAL_CAPACITY, used), used=used,
                     available=max(0, NOMINAL_CAPACITY - used))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _read_full(src: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``src`` unless the stream ends first (streams may return short
    reads); returns the bytes read. No intermediate copies: parts are large."""
    readinto = getattr(src, "readinto", None)
    got, n = 0, len(view)
    while got < n:
        if readinto is not None:
            k = readinto(view[got:])
        else:
            chunk = src.read(n - got)
            k = len(chunk) if chunk else 0
            view[got:got + k] = chunk or b""
        if not k:
            break
        got += k
    return got


def _seekable(src: BinaryIO) -> bool:
    try:
        return src.seekable() and src.tell() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _remaining(src: BinaryIO) -> int:
    """Bytes left to read in a seekable file."""
    here = src.tell()
    end = src.seek(0, io.SEEK_END)
    src.seek(here)
    return end - here


def _hash_rest(src: BinaryIO) -> str:
    """sha256 hex of the rest of a seekable file; the position is kept."""
    start = src.tell()
    h = hashlib.sha256()
    while chunk := src.read(READ_CHUNK * 8):
        h.update(chunk)
    src.seek(start)
    return h.hexdigest()


class _Stopped(Exception):
    """A download stream stopped because another one failed."""


class _OrderedHash:
    """The sha256 of a file whose segments are written by several streams at once: a chunk
    offered at the hash position is hashed at once (still in the CPU cache); a stream that
    reaches the hash position first reads its own earlier chunks back from the file; what
    no stream could take is read back by catch_up at the end. Reports progress (the
    hashed prefix); with ``hashing`` off it only counts."""

    def __init__(self, fd: int, progress: Progress | None, *, hashing: bool = True):
        self.fd, self.progress, self.hashing = fd, progress, hashing
        self.pos = self._counted = 0
        self.stopped = False  # another stream failed
        self._h = hashlib.sha256()
        self._lock = threading.Lock()

    def offer(self, chunk: memoryview, at: int, segment_start: int, flush=lambda: None) -> None:
        """``chunk`` is about to be written at ``at`` by the stream of the segment starting
        at ``segment_start``, which has handed [segment_start, at) to be written (``flush``
        waits until it is)."""
        if self.stopped:
            raise _Stopped()
        if not self.hashing:
            with self._lock:
                self._counted += len(chunk)
                if self.progress:
                    self.progress(self._counted)
            return
        if not segment_start <= self.pos <= at or not self._lock.acquire(blocking=False):
            return  # an earlier segment is still being hashed: catch up later
        try:
            if segment_start <= self.pos <= at:
                if self.pos < at:
                    flush()
                    self._read_back(at)
                self._h.update(chunk)
                self.pos = at + len(chunk)
                if self.progress:
                    self.progress(self.pos)
        finally:
            self._lock.release()

    def catch_up(self, end: int) -> None:
        if not self.hashing:
            return
        with self._lock:
            self._read_back(end)
            if self.progress:
                self.progress(self.pos)

    def _read_back(self, end: int) -> None:
        buf = None
        while self.pos < end:
            buf = buf or memoryview(bytearray(min(FETCH_CHUNK, end - self.pos)))
            k = os.preadv(self.fd, [buf[:min(len(buf), end - self.pos)]], self.pos)
            if not k:
                raise InvalidInput(f"downloaded file ends at {self.pos}, before {end}")
            self._h.update(buf[:k])
            self.pos += k

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while view:  # pwrite may write less than asked
        w = os.pwrite(fd, view, at)
        view, at = view[w:], at + w


def _readinto(body):
    """readinto(view) -> bytes read, for a botocore StreamingBody: straight from the HTTP
    response into the caller's buffer (no bytes object per read) where the body is the
    usual urllib3/http.client response, else through read()."""
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    if callable(getattr(fp, "readinto", None)):
        return fp.readinto

    def copy(view: memoryview) -> int:
        data = body.read(len(view))
        view[:len(data)] = data
        return len(data)
    return copy


def _drain(body) -> None:
    """Let the body see its end (so its connection goes back to the pool)."""
    try:
        body.read()
    except Exception:
        pass  # closing the body closes the connection instead


class _BodyReader(io.RawIOBase):
    """A streaming S3 body; when ``want`` is set, hashes it and raises InvalidInput at the
    end if the content is not what its name says."""

    def __init__(self, body, want: str | None, digest: str):
        self._body, self._want, self._digest = body, want, digest
        self._read = _readinto(body)
        self._h = hashlib.sha256() if want else None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        with memoryview(b).cast("B") as view:
            k = self._read(view)
            if k and self._h is not None:
                self._h.update(view[:k])
        if not k:
            if self._h is not None and self._h.hexdigest() != self._want:
                got = self._h.hexdigest()
                self._h = None
                raise InvalidInput(f"blob {self._digest} is corrupt in S3: its content is "
                                   f"sha256:{got}: delete it and import the image again")
            self._h = None
            return 0
        return k

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
