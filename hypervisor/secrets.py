"""libvirt secrets holding cephx keys, so QEMU can open RBD disks (``<auth><secret type='ceph'
uuid=.../></auth>``) without the key ever appearing in a domain's XML.

Terms: a *ceph secret* is a libvirt secret with usage type ``ceph``. Ours have a usage name
starting with ``nodeagent:`` and a UUID derived from (monitors, user, key fingerprint), so
defining the same disk twice reuses one secret and a rotated key gets a new one instead of
changing the key under running VMs. Lifecycle: absent -> ensure_ceph_secret() -> present ->
delete_unused_ceph_secrets() (once no domain references it) -> absent. Secrets are
persistent (not ephemeral: a domain must start again after a libvirtd restart) and private
(libvirt never hands the value back).
"""
from __future__ import annotations

import hashlib
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import libvirt

from agent.errors import CommandFailed
from hypervisor.validate import ceph_key_bytes

USAGE_PREFIX = "nodeagent:"  # usage names of the secrets this module made (and may delete)
SECRET_NAMESPACE = uuid.UUID("8c1b7c0e-5d0a-4f4e-9a51-6e6f64656167")  # uuid5 namespace for ceph secrets


def ceph_secret_uuid(monitors, user: str, key: str) -> str:
    """The UUID of the secret for this key: stable across runs and hosts."""
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    return str(uuid.uuid5(SECRET_NAMESPACE, f"{','.join(sorted(map(str, monitors)))}|{user}|{fingerprint}"))


def ensure_ceph_secret(conn: libvirt.virConnect, *, monitors, user: str, key: str) -> tuple[str, bool]:
    """Define (or reuse) the secret holding ``key`` for client.``user``; return (uuid, created).
    Idempotent. On failure no new secret is left."""
    value = ceph_key_bytes(key)
    sid = ceph_secret_uuid(monitors, user, key)
    try:
        secret = conn.secretLookupByUUIDString(sid)
        created = False
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
            raise _failed(e) from None
        desc = f"cephx key of client.{user} at {','.join(map(str, monitors)) or '(ceph.conf)'} (nodeagent)"
        xml = (f"<secret ephemeral='no' private='yes'><uuid>{sid}</uuid>"
               f"<description>{escape(desc)}</description>"
               f"<usage type='ceph'><name>{USAGE_PREFIX}{sid}</name></usage></secret>")
        try:
            secret = conn.secretDefineXML(xml)
        except libvirt.libvirtError as e:
            raise _failed(e) from None
        created = True
    try:
        secret.setValue(value)
    except libvirt.libvirtError as e:
        if created:
            _undefine(secret)
        raise _failed(e) from None
    return sid, created


def list_ceph_secrets(conn: libvirt.virConnect) -> list[str]:
    """UUIDs of the ceph secrets this module made."""
    out = []
    for s in conn.listAllSecrets(libvirt.VIR_CONNECT_LIST_SECRETS_EPHEMERAL
                                 | libvirt.VIR_CONNECT_LIST_SECRETS_NO_EPHEMERAL):
        try:
            if s.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH and s.usageID().startswith(USAGE_PREFIX):
                out.append(s.UUIDString())
        except libvirt.libvirtError:
            continue  # undefined while we looked
    return sorted(out)


def referenced_secrets(conn: libvirt.virConnect) -> set[str]:
    """Secret UUIDs any domain (ours or not; live or persistent definition) refers to."""
    used = set()
    for dom in conn.listAllDomains(0):
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
            try:
                root = ET.fromstring(dom.XMLDesc(flags))
            except libvirt.libvirtError:
                continue
            used |= {el.get("uuid") for el in root.iter("secret") if el.get("uuid")}
    return used


def delete_ceph_secret(conn: libvirt.virConnect, sid: str) -> bool:
    """Undefine one secret; False if it was already gone."""
    try:
        secret = conn.secretLookupByUUIDString(sid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return False
        raise _failed(e) from None
    return _undefine(secret)


def delete_unused_ceph_secrets(conn: libvirt.virConnect) -> list[str]:
    """Undefine our ceph secrets no domain refers to; return their UUIDs. The caller must
    serialise this with defines that may reuse a secret (LibvirtDriver holds a lock)."""
    used = referenced_secrets(conn)
    return [sid for sid in list_ceph_secrets(conn) if sid not in used and delete_ceph_secret(conn, sid)]


def _undefine(secret: libvirt.virSecret) -> bool:
    try:
        secret.undefine()
        return True
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return False
        raise _failed(e) from None


def _failed(e: libvirt.libvirtError) -> CommandFailed:
    msg = e.get_error_message() or str(e)
    return CommandFailed(f"libvirt cannot manage the Ceph secret: {msg}: check that libvirtd's "
                         "secret driver runs (libvirtd -d serves it) and /etc/libvirt/secrets "
                         "is writable", stderr=msg)
