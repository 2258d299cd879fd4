"""A cloud-init NoCloud seed: an ISO9660 image labelled "cidata" holding meta-data,
user-data and (optionally) network-config, made with xorriso (no genisoimage needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from agent.errors import CommandFailed, InvalidInput, Unavailable

SEED_LABEL = "cidata"  # what cloud-init's NoCloud datasource looks for
XORRISO_TIMEOUT_S = 30
DEFAULT_USER_DATA = "#cloud-config\n{}\n"


def _meta_data(instance_id: str, hostname: str) -> str:
    for label, value in (("instance_id", instance_id), ("hostname", hostname)):
        if not value or any(c in value for c in "\n\r:"):
            raise InvalidInput(f"bad {label} {value!r} for a NoCloud seed: one line, no ':'")
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def make_seed(path: str, *, instance_id: str, hostname: str, user_data: str | None = None,
              network_config: str | None = None) -> str:
    """Write a NoCloud seed ISO at ``path`` (replaced atomically) and return ``path``.
    On failure nothing is left at ``path``."""
    meta = _meta_data(instance_id, hostname)
    if shutil.which("xorriso") is None:
        raise Unavailable("xorriso is missing: apt-get install -y xorriso (or run scripts/setup-host)")
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=os.path.dirname(path)) as tmp:
        src = os.path.join(tmp, "src")
        os.mkdir(src)
        files = {"meta-data": meta, "user-data": user_data if user_data is not None else DEFAULT_USER_DATA}
        if network_config is not None:
            files["network-config"] = network_config
        for name, text in files.items():
            with open(os.path.join(src, name), "w") as f:
                f.write(text)
        iso = os.path.join(tmp, "seed.iso")
        argv = ["xorriso", "-as", "genisoimage", "-quiet", "-output", iso, "-volid", SEED_LABEL,
                "-joliet", "-rock", src]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=XORRISO_TIMEOUT_S)
        if r.returncode != 0:
            raise CommandFailed(f"xorriso could not build the seed {path}: {r.stderr.strip()}",
                                argv=argv, returncode=r.returncode, stderr=r.stderr)
        os.chmod(iso, 0o644)
        os.replace(iso, path)
    return path
