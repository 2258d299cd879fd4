"""How the hypervisors of two peers talk during a live migration (README "Migration
transport security"): with ``[migration] tls`` on, the source's libvirtd reaches the
destination's over ``qemu+tls`` (both present certificates of the operator's CA; the
destination's must name the address it is reached at) and QEMU streams memory and disks
over TLS. The destination's answer is a peer's word: with TLS on, anything but a
``qemu+tls`` URI is refused here, so a peer (or a man in the middle of a plain-HTTP peer
API) cannot downgrade the copy to cleartext.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from agent.config import MigrationConfig
from agent.errors import Unavailable, Unprocessable

TLS_SCHEME = "qemu+tls"
PLAIN_SCHEME = "qemu+tcp"

log = logging.getLogger(__name__)


def scheme(cfg: MigrationConfig) -> str:
    """The scheme this host's libvirtd answers peers on."""
    return TLS_SCHEME if cfg.tls_enabled else PLAIN_SCHEME


@dataclass(frozen=True)
class Route:
    uri: str  # what the source's libvirtd connects to (with this host's own pkipath)
    tls: bool  # QEMU's stream over TLS too


def route(answered: str, cfg: MigrationConfig, peer: str) -> Route:
    """The URI and transport for a migration to ``peer``, which answered ``answered``
    (already checked against models.MIGRATION_URI_PATTERN: no query, no user)."""
    if not answered.startswith("qemu+"):
        return Route(answered, False)  # another driver's URI (fake://): no libvirt transport
    if not cfg.tls_enabled:
        tls = answered.startswith(TLS_SCHEME + "://")
        if not tls:
            log.warning("migrating to %s over plain TCP: memory and disks cross the network in cleartext "
                        "(provision the migration certificates and set [migration] tls)", peer)
        return Route(answered, tls)
    if not answered.startswith(TLS_SCHEME + "://"):
        raise Unprocessable(f"peer {peer!r} answered the migration URI {answered!r}, but this host migrates "
                            f"only over TLS ([migration] tls): configure {peer!r} for qemu+tls (its libvirtd "
                            "with listen_tls and its certificates; README \"Migration transport security\")")
    missing = [f for f in cfg.client_files() if not os.path.isfile(f)]
    if missing:
        raise Unavailable(f"migration over TLS needs this host's client certificate files, missing: "
                          f"{', '.join(missing)}: provision them (the Ansible role's nodeagent_migration_tls_* "
                          "variables) or set [migration] tls = false")
    uri = f"{answered}?pkipath={cfg.pki_path}" if cfg.pki_path else answered
    return Route(uri, True)
