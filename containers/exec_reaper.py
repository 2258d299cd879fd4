"""The parent of a TTY exec: ``python -m containers.exec_reaper PID_FILE -- runc ... exec -d
--tty --console-socket SOCK --pid-file PID_FILE NAME CMD...``.

runc takes a console socket only when it detaches (``-d``), and a detached process is
reparented to the nearest child subreaper. This small process is that subreaper (as conmon is
for podman's execs): it runs runc, waits for the exec'd process and exits with its status
(128+N after signal N), so that the agent reads the exit code of its own child. runc's
failure (its stderr, its status) is passed on as it is."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m containers.exec_reaper PID_FILE -- RUNC_ARGV...", file=sys.stderr)
        return 125
    pid_file, cmd = argv[1], argv[3:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125
    started = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if started.returncode != 0:
        return started.returncode
    with open(pid_file) as f:
        pid = int(f.read().strip())
    while True:
        try:
            child, status = os.wait()
        except ChildProcessError:  # it was never ours (cannot happen with the subreaper set)
            return 125
        if child == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
