"""From a storage ``Volume`` to the ``DiskSpec`` libvirt attaches (file, rbd, nbd)."""
from __future__ import annotations

from urllib.parse import urlsplit

from agent.errors import InvalidInput
from hypervisor.driver import DiskSpec
from storage.backend import Volume


def disk_for_volume(volume: Volume, target: str, *, readonly: bool = False) -> DiskSpec:
    """The disk for ``volume`` at ``target`` (vda, vdb, ...). Volume.uri decides the type:
    file:///path, rbd:<pool>/<image> (attach facts from Volume.attach: monitors, user and the
    cephx key, which the driver turns into a libvirt secret), nbd://host:port/export."""
    if volume.format not in ("qcow2", "raw"):
        raise InvalidInput(f"volume {volume.name} is a {volume.format} volume, not a disk")
    uri = volume.uri or (f"file://{volume.path}" if volume.path else "")
    if uri.startswith("file://"):
        path = urlsplit(uri).path
        return DiskSpec(target=target, source=path, type="file", format=volume.format, readonly=readonly)
    if uri.startswith("rbd:"):
        attach = {k: v for k, v in volume.attach.items() if k in ("monitors", "user", "key", "secret_uuid")}
        return DiskSpec(target=target, source=uri[len("rbd:"):], type="rbd", format=volume.format,
                        readonly=readonly, attach=attach)
    if uri.startswith("nbd://"):
        tls = volume.attach.get("tls", "none")  # an export's storage.nbd tls mode
        if tls not in ("none", "x509"):
            raise InvalidInput(f"volume {volume.name} is an NBD export with tls={tls!r}: libvirt attaches NBD "
                               "over x509 TLS only (export it with tls='x509')")
        return DiskSpec(target=target, source=uri, type="nbd", format=volume.format, readonly=readonly,
                        attach={"tls": True} if tls == "x509" else {})
    raise InvalidInput(f"volume {volume.name} has no attachable uri ({volume.uri!r}): "
                       "expected file://, rbd: or nbd://")
