"""A CLI run on a terminal of its own (a pty), typed into as a user would."""
from __future__ import annotations


def run_in_pty(argv: list[str], steps: list[tuple[bytes, bytes]], *, env=None, cwd=None,
               timeout: float = 30) -> tuple[int, bytes]:
    """Run ``argv`` on a new terminal (a CLI user's): for each (wait_for, send) step, wait until
    ``wait_for`` has appeared in its output (b"": at once), then type ``send``; then read to
    its exit. Returns (exit code, all its output); AssertionError at ``timeout``."""
    import os
    import select
    import subprocess
    import time
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                            start_new_session=True)
    os.close(slave)
    out, seen = b"", 0
    deadline = time.monotonic() + timeout
    try:
        for wait_for, send in [*steps, (None, b"")]:
            while wait_for is None or wait_for not in out[seen:]:
                left = deadline - time.monotonic()
                assert left > 0, f"{wait_for!r} never came: {out[-2000:]!r}"
                if select.select([master], [], [], min(left, 0.2))[0]:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: it exited and closed the terminal
                        data = b""
                    if not data:
                        assert wait_for is None, f"{wait_for!r} never came: {out[-2000:]!r}"
                        break
                    out += data
                elif wait_for is None and proc.poll() is not None:
                    break
            if wait_for is not None:
                seen = out.index(wait_for, seen) + len(wait_for)
            if send:
                os.write(master, send)
        return proc.wait(max(1, deadline - time.monotonic())), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
