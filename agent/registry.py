"""Explicit driver registries: kind -> "module:Class", in this one place.

Nothing is imported at registration time: a driver's module (and libvirt, rbd,
boto3 with it) is imported only when a configured kind asks for it.

Every registered class is built the same way, by ``build``: its classmethod
``from_config(settings, *, state_dir, db, network)`` gets the settings of its config
section as a plain mapping (a pool's also carry its ``name``), the directory its state
lives under, the agent's database and the host's bridge network; it uses what it needs
and ignores the rest (the fakes ignore nearly everything).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import InvalidInput

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network


class Buildable(Protocol):
    """What every registered class offers: the uniform construction ``build`` calls."""

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> Any: ...

BACKENDS = {
    "local": "storage.local:LocalBackend",
    "block": "storage.rbd:RbdBackend",
    "object": "storage.s3:S3Backend",
    "fake": "storage.fake:FakeBackend",
}

DRIVERS = {
    "libvirt": "hypervisor.libvirt_driver:LibvirtDriver",
    "fake": "hypervisor.fake:FakeDriver",
}

RUNTIMES = {
    "runc": "containers.runc:RuncRuntime",
    "fake": "containers.fake:FakeRuntime",
}

_REGISTRIES = {"backend": BACKENDS, "driver": DRIVERS, "runtime": RUNTIMES}


def load(registry: str, kind: str) -> type[Buildable]:
    """Return the class registered as ``kind``; InvalidInput lists the known kinds."""
    table = _REGISTRIES[registry]
    try:
        target = table[kind]
    except KeyError:
        raise InvalidInput(f"unknown {registry} kind {kind!r}; known: {', '.join(sorted(table))}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build(registry: str, kind: str, settings: Mapping[str, Any], *, state_dir: str, db: Database,
          network: Network | None) -> Any:
    """The instance of the class registered as ``kind``, built from its settings."""
    return load(registry, kind).from_config(settings, state_dir=state_dir, db=db, network=network)
