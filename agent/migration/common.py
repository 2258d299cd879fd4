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
