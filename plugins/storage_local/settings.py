"""Settings of the ``storage_local`` storage backend (its section in ``gateway.toml``).
"""

from __future__ import annotations

from pydantic import Field

from gateway.sdk import PluginSection


class LocalSettings(PluginSection):
    """``[storage.local]``."""

    root: str = "var/media"
    fsync: bool = Field(True, description="fsync data and directories before a put returns")
    min_free_bytes: int = Field(
        64 * 1024 * 1024, ge=0,
        description="free bytes below which the filesystem counts as full: puts are deferred, /readyz is 503")
