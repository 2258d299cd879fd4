"""The one rooted error hierarchy of nodeagent.

Every package (agent, storage, hypervisor, containers) raises these; the API maps
them to HTTP codes in one handler (``http_status``). A message says what went wrong
and, where there is one, how to fix it.
"""
from __future__ import annotations

import re

# an absolute host path (not the "///" of a URI): what a reader token must not learn
_HOST_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"(),;:]*")


class AgentError(Exception):
    """Root of every error nodeagent raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(AgentError):
    """Raised when a request or a file (image, layer, config) is malformed."""

    code = "invalid"
    http_status = 400


class Unprocessable(AgentError):
    """Raised when input is well-formed but cannot be honoured (too much memory, bad format)."""

    code = "unprocessable"
    http_status = 422


class Unauthorized(AgentError):
    """Raised when a request carries no valid bearer token."""

    code = "unauthorized"
    http_status = 401


class Forbidden(AgentError):
    """Raised when a valid token's role does not allow the request."""

    code = "forbidden"
    http_status = 403


class NotFound(AgentError):
    """Raised by ``get_*`` when the named thing does not exist."""

    code = "not_found"
    http_status = 404


class Conflict(AgentError):
    """Raised when the request clashes with current state (name taken, image in use)."""

    code = "conflict"
    http_status = 409


class Unsupported(AgentError):
    """Raised when a driver or this host lacks a capability (no KVM, no CRIU, blobs-only pool)."""

    code = "unsupported"
    http_status = 422


class Unavailable(AgentError):
    """Raised when a component the agent needs is down (libvirtd, Ceph, S3); says how to start it."""

    code = "unavailable"
    http_status = 503


class InsufficientResources(AgentError):
    """Raised when a pool is full or the host lacks memory/cpus for a request."""

    code = "insufficient_resources"
    http_status = 507


class CommandFailed(AgentError):
    """Raised when an external tool (qemu-img, runc, skopeo) exits non-zero."""

    code = "command_failed"
    http_status = 500

    def __init__(self, message: str, *, argv=None, returncode=None, stderr: str = ""):
        super().__init__(message, argv=list(argv or []), returncode=returncode,
                         stderr=stderr[-2000:])


class PostCopyFailed(CommandFailed):
    """Raised when a live migration fails after it switched to post-copy: the guest's memory
    is split between the two hosts, it is paused (or stalls) on both, and neither half may be
    destroyed until an operator recovers it (libvirt's post-copy resume) or gives it up."""

    code = "postcopy_failed"


class Cancelled(AgentError):
    """Raised inside an operation when a user cancelled it."""

    code = "cancelled"
    http_status = 409


def redact(text: str | None) -> str | None:
    """``text`` with host paths replaced by ``<path>``."""
    return _HOST_PATH.sub("<path>", text) if text else text


def public_error(error: dict | None, ref: str | None = None) -> dict | None:
    """An error body as a reader token sees it: its code and message without host paths,
    and no details (argv, stderr, paths). Admin tokens see the full error; the agent's log
    has it too, under ``ref`` (the operation id)."""
    if not error:
        return error
    message = redact(error.get("message") or "")
    if ref:
        message += f" (details for admins: ref {ref})"
    return {"code": error.get("code", "internal"), "message": message}
