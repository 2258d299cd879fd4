"""Validation shared by every storage backend: digests and volume names."""
from __future__ import annotations

from agent.errors import InvalidInput
from storage.backend import VOLUME_FORMATS, VolumeSpec

HEX = frozenset("0123456789abcdef")


def parse_digest(digest: str) -> str:
    """Return the hex of ``sha256:<64 hex>``; InvalidInput otherwise."""
    algo, _, hexpart = (digest or "").partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not HEX.issuperset(hexpart):
        raise InvalidInput(f"digest {digest!r} is not of the form sha256:<64 lowercase hex>")
    return hexpart


def check_volume_spec(spec: VolumeSpec) -> None:
    if spec.format not in VOLUME_FORMATS:
        raise InvalidInput(f"volume format {spec.format!r} is not one of {', '.join(VOLUME_FORMATS)}")
    if not spec.name or "/" in spec.name or spec.name.startswith(".") or len(spec.name) > 200:
        raise InvalidInput(f"volume name {spec.name!r} must be 1-200 chars, no '/', not starting with '.'")
    if spec.size < 0:
        raise InvalidInput("volume size must be >= 0")
