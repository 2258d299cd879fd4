"""A minimal ISO 9660 writer: one root directory of a few small files, nothing else.

Enough for a cloud-init NoCloud seed, in-process (xorriso costs ~110 ms a seed, mostly
start-up; this takes well under a millisecond). Layout, in 2048-byte sectors:
0-15 system area, 16 primary volume descriptor, 17 terminator, 18 L path table,
19 M path table, 20 root directory, 21.. file data, then 150 sectors of padding. File names are stored upper-case
with ";1" (ISO 9660 level 2 lengths); Linux shows them lower-case without the version.
"""
from __future__ import annotations

import os
import re
import struct
import time

SECTOR = 2048
PVD_SECTOR, TERM_SECTOR, LPATH_SECTOR, MPATH_SECTOR, ROOT_SECTOR = 16, 17, 18, 19, 20
FIRST_FILE_SECTOR = 21
PAD_SECTORS = 150  # 300 KiB of trailing zeros, as genisoimage -pad: probes (busybox findfs
# reads 68 KiB up front) and some drives read past a tiny image's end
MAX_NAME = 30  # level 2: 31 chars with the ";1" minus the optional period
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,%d}$" % MAX_NAME)


def _both16(n: int) -> bytes:
    return struct.pack("<H", n) + struct.pack(">H", n)


def _both32(n: int) -> bytes:
    return struct.pack("<I", n) + struct.pack(">I", n)


def _pad(text: str, n: int) -> bytes:
    return text.encode("ascii").ljust(n, b" ")[:n]


def _dir_date(t: time.struct_time) -> bytes:
    return bytes([t.tm_year - 1900, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, 0])


def _vol_date(t: time.struct_time) -> bytes:
    return time.strftime("%Y%m%d%H%M%S", t).encode() + b"00" + b"\x00"


def _record(ident: bytes, extent: int, size: int, is_dir: bool, date: bytes) -> bytes:
    length = 33 + len(ident) + (1 if len(ident) % 2 == 0 else 0)
    rec = (bytes([length, 0]) + _both32(extent) + _both32(size) + date
           + bytes([2 if is_dir else 0, 0, 0]) + _both16(1) + bytes([len(ident)]) + ident)
    return rec.ljust(length, b"\x00")


def write_iso(path: str, files: dict[str, bytes], *, volume_id: str) -> None:
    """Write an ISO 9660 image holding ``files`` (name -> content) in its root, labelled
    ``volume_id``. The root directory must fit one sector (a handful of files)."""
    for name in files:
        if not NAME_RE.match(name):
            raise ValueError(f"bad ISO 9660 file name {name!r}")
    now = time.gmtime()
    ddate = _dir_date(now)
    names = sorted(files, key=lambda n: n.upper())
    extents, sector = {}, FIRST_FILE_SECTOR
    for name in names:
        extents[name] = sector
        sector += max(1, -(-len(files[name]) // SECTOR))
    total = sector + PAD_SECTORS
    root = (_record(b"\x00", ROOT_SECTOR, SECTOR, True, ddate)
            + _record(b"\x01", ROOT_SECTOR, SECTOR, True, ddate)
            + b"".join(_record(n.upper().encode() + b";1", extents[n], len(files[n]), False, ddate)
                       for n in names))
    if len(root) > SECTOR:
        raise ValueError("too many files for a one-sector root directory")
    vdate = _vol_date(now)
    pvd = (b"\x01CD001\x01\x00" + _pad("LINUX", 32) + _pad(volume_id, 32) + bytes(8)
           + _both32(total) + bytes(32) + _both16(1) + _both16(1) + _both16(SECTOR)
           + _both32(10) + struct.pack("<I", LPATH_SECTOR) + bytes(4)
           + struct.pack(">I", MPATH_SECTOR) + bytes(4)
           + _record(b"\x00", ROOT_SECTOR, SECTOR, True, ddate)
           + _pad("", 128) + _pad("", 128) + _pad("", 128) + _pad("NODEAGENT", 128)
           + _pad("", 37) + _pad("", 37) + _pad("", 37)
           + vdate + vdate + b"0" * 16 + b"\x00" + vdate + b"\x01\x00")
    term = b"\xffCD001\x01"
    lpath = bytes([1, 0]) + struct.pack("<I", ROOT_SECTOR) + struct.pack("<H", 1) + b"\x00\x00"
    mpath = bytes([1, 0]) + struct.pack(">I", ROOT_SECTOR) + struct.pack(">H", 1) + b"\x00\x00"
    with open(path, "wb") as f:
        f.write(bytes(SECTOR * PVD_SECTOR))
        for block in (pvd, term, lpath, mpath, root):
            f.write(block.ljust(SECTOR, b"\x00"))
        for name in names:
            data = files[name]
            f.write(data)
            f.write(bytes((-len(data)) % SECTOR if data else SECTOR))
        f.write(bytes(PAD_SECTORS * SECTOR))
        f.flush()
        os.fsync(f.fileno())
