"""A tiny static x86_64 program that makes one raw syscall and exits with its errno (0 on
success): hostile tests run it inside containers to see what the seccomp filter lets
through, whatever the image holds (busybox has no way to make an arbitrary syscall).
Hand-assembled, so no compiler is needed where the tests run."""
from __future__ import annotations

import os
import struct

BASE = 0x400000  # load address of the one segment
HEADERS = 64 + 56  # ELF header + one program header


def _imm32(v: int) -> bytes:
    if not -2**31 <= v < 2**31:
        raise ValueError(f"{v} does not fit a sign-extended imm32")
    return struct.pack("<i", v)


def program(nr: int, *args: int) -> bytes:
    """The ELF image: syscall(nr, *args) (up to 3 arguments, the rest 0), then
    exit_group(errno or 0)."""
    a = list(args) + [0] * (3 - len(args))
    code = b"".join([
        b"\x48\xc7\xc0" + _imm32(nr),    # mov rax, nr
        b"\x48\xc7\xc7" + _imm32(a[0]),  # mov rdi, a0
        b"\x48\xc7\xc6" + _imm32(a[1]),  # mov rsi, a1
        b"\x48\xc7\xc2" + _imm32(a[2]),  # mov rdx, a2
        b"\x4d\x31\xd2",                 # xor r10, r10
        b"\x4d\x31\xc0",                 # xor r8, r8
        b"\x4d\x31\xc9",                 # xor r9, r9
        b"\x0f\x05",                     # syscall
        b"\x31\xff",                     # xor edi, edi
        b"\x48\x3d\x01\xf0\xff\xff",     # cmp rax, -4095
        b"\x72\x06",                     # jb done (unsigned: not an error)
        b"\x48\x89\xc7",                 # mov rdi, rax
        b"\x48\xf7\xdf",                 # neg rdi
        b"\xb8\xe7\x00\x00\x00",         # done: mov eax, 231 (exit_group)
        b"\x0f\x05",                     # syscall
    ])
    size = HEADERS + len(code)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       2, 0x3E, 1, BASE + HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE, BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + code


def install(root: str, name: str, nr: int, *args: int) -> str:
    """Write the program for ``syscall(nr, *args)`` as ``root``/bin/``name`` (0755); the
    path inside the container."""
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    path = os.path.join(root, "bin", name)
    with open(path, "wb") as f:
        f.write(program(nr, *args))
    os.chmod(path, 0o755)
    return f"/bin/{name}"
