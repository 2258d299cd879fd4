"""What both sides of a migration share."""
from __future__ import annotations

from hypervisor.driver import SupportsIncomingDisks

INCOMING = "incoming"  # instance state on the destination until the source confirms
LOCAL_POOL_KINDS = ("local", "fake")  # pools whose volumes are host-local: migration copies them


def drop_unused_secrets(root, leaving: str) -> None:
    """The Ceph secrets no domain uses go, unless another incoming migration is under
    way here: its secret is unused until its domain arrives at the switchover."""
    if isinstance(root.driver, SupportsIncomingDisks) and \
            not any(i.id != leaving for i in root.records.list(states=(INCOMING,))):
        root.driver.delete_unused_secrets()


def problems(e) -> str:
    """The first problems of a pydantic ValidationError, in one line (no input echoed)."""
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                     for err in e.errors(include_url=False, include_input=False)[:5])


def cpu_model_of(cpu_xml: str | None) -> str | None:
    """The named model of a guest's <cpu> XML (None: none, or not parseable: the driver's check says)."""
    import xml.etree.ElementTree as ET
    if not cpu_xml or "<!" in cpu_xml:
        return None
    try:
        return ET.fromstring(cpu_xml).findtext("model") or None
    except ET.ParseError:
        return None


def other_group_model(guest_cpu: str | None, host_model: str | None, group: str | None) -> str | None:
    """Why a host whose guests get ``host_model`` (a host group's named baseline) does not take
    a guest of CPU ``guest_cpu``: it names another model (README "CPU model"); None if it may
    (the same model, no named model there, or a guest without one)."""
    model = cpu_model_of(guest_cpu)
    if not model or not host_model or host_model == "host-model" or model == host_model:
        return None
    where = f"host group {group!r}" if group else "that host"
    return (f"its guests run CPU model {host_model!r} ({where}; [hypervisor] cpu_model) and this VM's is "
            f"{model!r}: migrate it within its own group, or restart it on a host of that group's model")
