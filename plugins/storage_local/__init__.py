"""Storage plugin ``local``: objects as files under a root directory.

Settings ``[storage.local]``: ``root`` (default ``var/media``, relative to the config file),
``fsync`` (default true: data and directory are fsynced before ``put`` returns), ``min_free_bytes``
(default 64 MiB: below it the filesystem counts as full).

A full filesystem is an outage, not a bad object: ``put`` refuses with :class:`StorageError` while
free space is under ``min_free_bytes``, and ``ENOSPC`` (or any other ``OSError``) during a write
becomes a :class:`StorageError` too, with the temp file removed; ``check`` (``/readyz``) fails while
free space is under ``min_free_bytes``, and ``free_bytes`` feeds ``gateway_storage_free_bytes``.

Writes are atomic: bytes go to ``<root>/.tmp/<random>``, are fsynced, and are renamed into place,
so a reader sees a whole object or none, and a crash leaves only a temp file (removed at start).
Keys are confined under the root: absolute keys, ``..``, empty or dot-led segments, backslashes and
NUL are refused, and the resolved path must stay inside the root (symlinks included). Content type
and metadata are kept as JSON in the file's extended attribute ``user.gateway.meta`` (set before the
fsync and the rename, so they are published and durable with the data); on a filesystem without
user extended attributes, in a JSON sidecar under ``<root>/.meta/`` (read as well for objects stored
that way). All file I/O runs in threads.
"""

from __future__ import annotations

from gateway.sdk import Settings, hookimpl, plugin_settings
from plugins.storage_local.backend import LocalStorage
from plugins.storage_local.settings import LocalSettings

__all__ = ["LocalStorage", "LocalSettings", "register_storage", "settings_sections"]


@hookimpl
def settings_sections() -> dict[str, type[LocalSettings]]:
    """``[storage.local]`` is this plugin's section."""
    return {"storage.local": LocalSettings}


@hookimpl
def register_storage(settings: Settings) -> list[LocalStorage] | None:
    """Offer the ``local`` backend when ``storage.backend = "local"``."""
    if settings.storage.backend != LocalStorage.name:
        return None
    cfg = plugin_settings(settings, ("storage", "local"), LocalSettings)
    return [LocalStorage(settings.resolve_path(cfg.root), fsync=cfg.fsync, min_free_bytes=cfg.min_free_bytes)]
