"""Explicit driver registries: kind -> "module:Class", in this one place.

Nothing is imported at registration time: a driver's module (and libvirt, rbd,
boto3 with it) is imported only when a configured kind asks for it.
"""
from __future__ import annotations

import importlib

from agent.errors import InvalidInput

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


def load(registry: str, kind: str) -> type:
    """Return the class registered as ``kind``; InvalidInput lists the known kinds."""
    table = _REGISTRIES[registry]
    try:
        target = table[kind]
    except KeyError:
        raise InvalidInput(f"unknown {registry} kind {kind!r}; known: {', '.join(sorted(table))}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
