"""A cloud-init NoCloud seed: an ISO 9660 image labelled "cidata" holding meta-data,
user-data and (optionally) network-config. Written in-process by hypervisor.iso9660
(same layout genisoimage/xorriso make for this, ~100x faster than starting xorriso)."""
from __future__ import annotations

import os
import tempfile

from agent.errors import InvalidInput
from hypervisor.iso9660 import write_iso

SEED_LABEL = "cidata"  # what cloud-init's NoCloud datasource looks for
# user_data holds tenants' secrets: only root reads the seed. libvirt's DAC driver
# (qemu.conf dynamic_ownership = 1, the default) hands it to the QEMU user at start and back
# to root at stop; the directories above it must only be traversable (0711), not readable.
SEED_MODE = 0o600
DEFAULT_USER_DATA = "#cloud-config\n{}\n"


def _meta_data(instance_id: str, hostname: str) -> str:
    for label, value in (("instance_id", instance_id), ("hostname", hostname)):
        if not value or any(c in value for c in "\n\r:"):
            raise InvalidInput(f"bad {label} {value!r} for a NoCloud seed: one line, no ':'")
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def network_config(mac: str, address: str, gateway: str | None = None) -> str:
    """Netplan v2 network-config for the NIC with ``mac``: a static ``address`` ("ip/prefix")
    and a default route via ``gateway``."""
    routes = f"    routes:\n      - to: default\n        via: {gateway}\n" if gateway else ""
    return (f"version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: \"{mac}\"\n"
            f"    set-name: eth0\n    addresses:\n      - {address}\n{routes}")


def make_seed(path: str, *, instance_id: str, hostname: str, user_data: str | None = None,
              network_config: str | None = None) -> str:
    """Write a NoCloud seed ISO at ``path`` (replaced atomically) and return ``path``.
    On failure nothing is left at ``path``."""
    files = {"meta-data": _meta_data(instance_id, hostname).encode(),
             "user-data": (user_data if user_data is not None else DEFAULT_USER_DATA).encode()}
    if network_config is not None:
        files["network-config"] = network_config.encode()
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".seed-", suffix=".iso", dir=os.path.dirname(path))
    os.close(fd)
    try:
        write_iso(tmp, files, volume_id=SEED_LABEL)
        os.chmod(tmp, SEED_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
