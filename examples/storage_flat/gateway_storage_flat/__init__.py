"""Storage backend ``flat`` for the chat-media gateway: an example third-party plugin.

Objects live flat in one directory, each under the SHA-256 (hex) of its object key
(``<root>/objects/<sha256(key)>``); ``<root>/index.json`` maps every object key to its file name,
size (bytes), content type, modification time (epoch seconds) and metadata. Writes go to a
temporary file first and are renamed into place, and the index is rewritten atomically (a
temporary file renamed over it), so readers see a whole object or none. Blocking file I/O runs in
threads, off the event loop.

Select it with ``storage.backend = "flat"``; its section::

    [storage.flat]
    root = "var/flat"   # relative to the config file's directory

It imports only :mod:`gateway.sdk` and registers through the ``gateway`` entry-point group (see
this package's ``pyproject.toml``).
"""

from __future__ import annotations

from gateway.sdk import PluginSection, Settings, hookimpl, plugin_settings
from gateway_storage_flat.backend import FlatStorage

__all__ = ["FlatSettings", "FlatStorage", "register_storage", "settings_sections"]


class FlatSettings(PluginSection):
    """``[storage.flat]``: ``root``, the directory (relative to the config file's directory)."""

    root: str = "var/flat"


@hookimpl
def settings_sections() -> dict[str, type[FlatSettings]]:
    """``[storage.flat]`` is this plugin's section."""
    return {"storage.flat": FlatSettings}


@hookimpl
def register_storage(settings: Settings) -> list[FlatStorage] | None:
    """Offer the ``flat`` backend when ``storage.backend = "flat"``."""
    if settings.storage.backend != FlatStorage.name:
        return None
    cfg = plugin_settings(settings, ("storage", "flat"), FlatSettings)
    return [FlatStorage(settings.resolve_path(cfg.root))]
