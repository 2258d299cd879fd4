"""S3Backend against the live radosgw: multipart, ranges, verification, failures."""
from __future__ import annotations

import hashlib
import io
import os
from unittest import mock

import pytest

from agent.errors import InvalidInput, NotFound, Unavailable, Unsupported
from storage.backend import VolumeSpec
from storage.units import MiB

pytestmark = pytest.mark.real



@pytest.fixture
def s3(ceph, tmp_path):
    from testbed.ceph_cluster import object_backend

    b = object_backend(tmp_path, part_size=5 * MiB, concurrency=3)
    yield b
    b.close()


def leftovers(b):
    c = b.client
    objs = [o["Key"] for o in c.list_objects_v2(Bucket=b.bucket).get("Contents", [])]
    ups = [u["Key"] for u in c.list_multipart_uploads(Bucket=b.bucket).get("Uploads", [])]
    return objs, ups


def test_multipart_roundtrip_ranges_and_layout(s3):
    data = os.urandom(17 * MiB + 5)  # 4 parts of 5 MiB
    seen = []
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    info = s3.put_blob(io.BytesIO(data), digest=d, size=len(data), progress=seen.append)
    assert info.digest == d and info.size == len(data) and seen[-1] == len(data)
    objs, ups = leftovers(s3)
    assert objs == ["sha256/" + d.split(":")[1]] and ups == []
    head = s3.client.head_object(Bucket=s3.bucket, Key=objs[0])
    assert head["Metadata"]["sha256"] == d.split(":")[1]
    assert s3.open_blob(d).read() == data
    with s3.open_blob(d, 6 * MiB - 3, 10) as f:
        assert f.read() == data[6 * MiB - 3:6 * MiB + 7]
    # a pipe-like stream of unknown digest: lands under a temp key first, then only
    # under its digest
    class Pipe:
        def __init__(self, b):
            self._b = io.BytesIO(b)

        def read(self, n=-1):
            return self._b.read(n)

    info2 = s3.put_blob(Pipe(data[:7 * MiB]))
    assert info2.digest == "sha256:" + hashlib.sha256(data[:7 * MiB]).hexdigest()
    objs, ups = leftovers(s3)
    assert sorted(objs) == sorted(["sha256/" + d.split(":")[1], "sha256/" + info2.digest[7:]])
    assert ups == []


@pytest.mark.parametrize("seekable", [True, False])
def test_unknown_content_beyond_one_copy_object(s3, monkeypatch, seekable):
    """Past S3's single-CopyObject limit (lowered here to 6 MiB), a file is hashed before its
    upload and a stream is copied into place part by part: either way only the blob stays."""
    import storage.s3

    monkeypatch.setattr(storage.s3, "COPY_OBJECT_MAX", 6 * MiB)
    data = os.urandom(11 * MiB)
    src = io.BytesIO(data)
    if not seekable:
        src.seekable = lambda: False
    info = s3.put_blob(src)
    assert info.digest == "sha256:" + hashlib.sha256(data).hexdigest() and info.size == len(data)
    assert leftovers(s3) == (["sha256/" + info.digest[7:]], [])
    head = s3.client.head_object(Bucket=s3.bucket, Key="sha256/" + info.digest[7:])
    assert head["Metadata"]["sha256"] == info.digest[7:]
    assert s3.open_blob(info.digest).read() == data


def test_mismatch_aborts_multipart_and_leaves_nothing(s3):
    data = os.urandom(11 * MiB)
    with pytest.raises(InvalidInput, match="digest mismatch"):
        s3.put_blob(io.BytesIO(data), digest="sha256:" + "1" * 64)
    with pytest.raises(InvalidInput, match="size mismatch"):
        s3.put_blob(io.BytesIO(data), size=5)
    assert leftovers(s3) == ([], [])


def test_failed_part_aborts_the_upload(s3):
    real = s3.client.upload_part
    calls = []

    def flaky(**kw):  # fault injection: the third part fails
        calls.append(kw["PartNumber"])
        if kw["PartNumber"] == 3:
            raise OSError("connection reset (injected)")
        return real(**kw)

    with mock.patch.object(s3.client, "upload_part", side_effect=flaky):
        with pytest.raises(Exception):
            s3.put_blob(io.BytesIO(os.urandom(16 * MiB)))
    assert 3 in calls
    assert leftovers(s3) == ([], [])


def test_fetch_blob_one_stream_to_a_file(s3, tmp_path):
    data = os.urandom(13 * MiB + 1)
    info = s3.put_blob(io.BytesIO(data))
    seen = []
    assert s3.fetch_blob(info.digest, str(tmp_path / "img"), progress=seen.append) == info
    assert (tmp_path / "img").read_bytes() == data
    assert seen == sorted(seen) and seen[-1] == len(data)


@pytest.fixture
def small_segments(monkeypatch):
    """Segments of 2 MiB read 256 KiB at a time: several streams on a test-sized object."""
    import storage.s3
    monkeypatch.setattr(storage.s3, "FETCH_RANGE", 2 * MiB)
    monkeypatch.setattr(storage.s3, "FETCH_CHUNK", 256 << 10)


@pytest.mark.parametrize("streams", [2, 5])
def test_fetch_blob_several_streams_verified_in_order(s3, tmp_path, small_segments, streams):
    s3.fetch_streams = streams
    data = os.urandom(11 * MiB + 3)
    info = s3.put_blob(io.BytesIO(data))
    seen = []
    dest = tmp_path / "img"
    assert s3.fetch_blob(info.digest, str(dest), progress=seen.append, writeback=True) == info
    assert dest.read_bytes() == data
    assert seen == sorted(seen) and seen[-1] == len(data)  # progress is the hashed prefix
    assert s3.fetch_object("sha256/" + info.digest[7:], str(tmp_path / "plain")) == len(data)
    assert (tmp_path / "plain").read_bytes() == data


def test_failed_stream_stops_the_others_and_leaves_nothing(s3, tmp_path, small_segments):
    from agent.errors import Cancelled
    s3.fetch_streams = 4
    info = s3.put_blob(io.BytesIO(os.urandom(9 * MiB)))

    def cancel_midway(done):
        if done > 3 * MiB:
            raise Cancelled("cancelled by the test")
    with pytest.raises(Cancelled):
        s3.fetch_blob(info.digest, str(tmp_path / "img"), progress=cancel_midway)
    assert list(tmp_path.iterdir()) == []
    assert s3.fetch_streams == 4 and s3.fetch_blob(info.digest, str(tmp_path / "img")) == info


def test_corrupt_object_is_detected_on_download(s3, tmp_path):
    d = s3.put_blob(io.BytesIO(b"good content")).digest
    s3.client.put_object(Bucket=s3.bucket, Key="sha256/" + d[7:], Body=b"evil content")
    with pytest.raises(InvalidInput, match="corrupt"):
        s3.open_blob(d).read()
    with pytest.raises(InvalidInput, match="corrupt"):
        s3.fetch_blob(d, str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_corrupt_object_is_detected_across_streams(s3, tmp_path, small_segments):
    s3.fetch_streams = 3
    good = os.urandom(7 * MiB)
    d = s3.put_blob(io.BytesIO(good)).digest
    bad = bytearray(good)
    bad[6 * MiB] ^= 1  # one bit in the last segment
    s3.client.put_object(Bucket=s3.bucket, Key="sha256/" + d[7:], Body=bytes(bad))
    with pytest.raises(InvalidInput, match="corrupt"):
        s3.fetch_blob(d, str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_volumes_are_unsupported(s3):
    with pytest.raises(Unsupported, match="object pool"):
        s3.create_volume(VolumeSpec("v", MiB, "raw"))
    with pytest.raises(Unsupported):
        s3.list_volumes()


def test_wrong_keys_missing_bucket_and_unreachable(ceph):
    from storage.s3 import S3Backend

    bad_keys = S3Backend("objbad", endpoint=ceph.s3_endpoint, bucket=ceph.s3_bucket,
                         access_key=ceph.s3_access_key, secret_key="wrong" * 8)
    with pytest.raises(Unavailable, match="credentials"):
        bad_keys.put_blob(io.BytesIO(b"x"))
    no_bucket = S3Backend("objnob", endpoint=ceph.s3_endpoint, bucket="does-not-exist",
                          access_key=ceph.s3_access_key, secret_key=ceph.s3_secret_key)
    with pytest.raises(Unavailable, match="does-not-exist.*does not exist"):
        no_bucket.put_blob(io.BytesIO(b"x"))
    with pytest.raises(Unavailable, match="does not exist"):
        no_bucket.list_blobs()
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = S3Backend("objdown", endpoint=f"http://127.0.0.1:{port}", bucket="b",
                     access_key="a", secret_key="b")
    with pytest.raises(Unavailable, match="unreachable"):
        down.stat_blob("sha256:" + "2" * 64)
    with pytest.raises(NotFound):
        S3Backend("o", endpoint=ceph.s3_endpoint, bucket=ceph.s3_bucket,
                  access_key=ceph.s3_access_key,
                  secret_key=ceph.s3_secret_key).stat_blob("sha256:" + "3" * 64)
    with pytest.raises(InvalidInput, match="part_size"):
        S3Backend("o", endpoint="http://x", bucket="b", access_key="a", secret_key="b",
                  part_size=1024)


def test_failed_write_stops_the_download_and_leaves_nothing(s3, tmp_path, small_segments):
    import errno

    import storage.s3
    info = s3.put_blob(io.BytesIO(os.urandom(5 * MiB)))
    writes = []

    def full_disk(fd, view, at):
        writes.append(at)
        raise OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(storage.s3, "_pwrite_all", full_disk):
        with pytest.raises(Exception, match="No space left"):
            s3.fetch_blob(info.digest, str(tmp_path / "img"))
    assert writes == [0]  # the first failed write ended the stream
    assert list(tmp_path.iterdir()) == []
    assert s3.fetch_blob(info.digest, str(tmp_path / "img")) == info


def test_signed_payload_roundtrip(ceph, tmp_path):
    from testbed.ceph_cluster import object_backend
    b = object_backend(tmp_path, part_size=5 * MiB, concurrency=2, sign_payload=True)
    try:
        data = os.urandom(11 * MiB)  # 3 parts, each body SigV4-signed
        info = b.put_blob(io.BytesIO(data))
        assert info.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        b.fetch_blob(info.digest, str(tmp_path / "back"))
        assert (tmp_path / "back").read_bytes() == data
    finally:
        b.close()
