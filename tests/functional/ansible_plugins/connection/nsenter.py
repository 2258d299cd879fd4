"""An Ansible connection into a running system container by its init's PID: every command
runs under ``nsenter -t PID -a`` (all its namespaces), files go through ``cat`` in there.
Used by tests/functional/test_systemd_host.py to run the role against a systemd booted by
``systemd-nspawn -b --register=no`` (no machined, so no machinectl)."""
from __future__ import annotations

import subprocess

from ansible.errors import AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nsenter
short_description: Run tasks inside the namespaces of a process (a system container's init)
description:
  - Runs commands with C(nsenter -t PID -a /bin/sh -c CMD) and copies files with cat inside.
author: nodeagent maintainers
options:
  nsenter_pid:
    description: PID (in the controller's PID namespace) of the container's init.
    type: int
    required: true
    vars:
      - name: ansible_nsenter_pid
"""


class Connection(ConnectionBase):
    transport = "nsenter"
    has_pipelining = True

    def _connect(self):
        self._connected = True
        return self

    def _enter(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(int(self.get_option("nsenter_pid"))), "-a", *argv]

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = subprocess.run(self._enter("/bin/sh", "-c", cmd), input=in_data, capture_output=True)
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as src:
            proc = subprocess.run(self._enter("/bin/sh", "-c", 'cat > "$0"', out_path), stdin=src,
                                  capture_output=True)
        if proc.returncode != 0:
            raise AnsibleError(f"cannot write {out_path} in the container: {proc.stderr.decode(errors='replace')}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as dst:
            proc = subprocess.run(self._enter("cat", "--", in_path), stdout=dst, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise AnsibleError(f"cannot read {in_path} in the container: {proc.stderr.decode(errors='replace')}")

    def close(self):
        self._connected = False
