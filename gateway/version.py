"""The installed package's version (a leaf module)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def gateway_version() -> str:
    """The installed ``chat-media-gateway`` version, or ``0+unknown``."""
    try:
        return version("chat-media-gateway")
    except PackageNotFoundError:
        return "0+unknown"
