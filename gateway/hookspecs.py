"""Every pluggy hook of the gateway, in one place (DESIGN §4).

Plugins implement hooks with ``@gateway.hookimpl`` and register through the entry-point group
``gateway`` in their ``pyproject.toml``::

    [project.entry-points.gateway]
    my_plugin = "my_package.plugin_module"

pluggy is synchronous: hooks return objects, and the host awaits what needs awaiting (a hook may
return a coroutine or an awaitable where noted).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("gateway")
hookimpl = pluggy.HookimplMarker("gateway")


@hookspec
def register_providers(settings: Any) -> list[Any] | None:
    """Return the provider objects (:class:`gateway.providers.Provider`) this plugin offers for
    ``settings`` (:class:`gateway.config.Settings`), e.g. only when ``[providers.<name>]`` is
    present and enabled. Validate your section with :func:`gateway.config.plugin_settings` so a bad
    value stops the daemon with the setting's name. Constructing must not do I/O.
    """


@hookspec
def settings_sections() -> dict[str, Any] | None:
    """Return the settings sections this plugin owns, as ``{"<table>.<name>": model}`` with
    ``<table>`` ``providers`` or ``storage`` and ``model`` a :class:`gateway.config.PluginSection`
    subclass, e.g. ``{"providers.waha": WahaSettings}``. At start the host refuses sections that no
    plugin owns (a typo such as ``[storage.lcoal]``) and validates every present section with its
    model, so unknown keys inside it are refused too.
    """


@hookspec
def register_storage(settings: Any) -> list[Any] | None:
    """Return storage backend objects (:class:`gateway.storage.StorageBackend`). The host uses the
    one whose ``name`` equals ``settings.storage.backend``; return yours only when selected.
    Constructing must not do I/O: open resources in the backend's ``start()``.
    """


@hookspec
def register_routes(app: Any) -> None:
    """Add extra HTTP routes to the aiohttp ``app`` (called before the app starts)."""


@hookspec
def startup(app: Any) -> Any:
    """Called once the app's resources are open. May return an awaitable."""


@hookspec
def shutdown(app: Any) -> Any:
    """Called before the app's resources close. May return an awaitable."""


@hookspec
def media_stored(record: dict[str, Any]) -> Any:
    """Notification: a media object was stored; ``record`` is its catalog row (a dict with id,
    sha256, size in bytes, mimetype, category, key, provider, ...). Return value ignored;
    may return an awaitable."""


@hookspec
def media_updated(record: dict[str, Any]) -> Any:
    """Notification: a media object's catalog row changed (filename, metadata, is_public,
    expires_at through the files API); ``record`` is the new row. May return an awaitable."""


@hookspec
def media_deleted(record: dict[str, Any]) -> Any:
    """Notification: a media object and its row were deleted (files API or retention cleanup);
    ``record`` is the row as it was. May return an awaitable."""


@hookspec
def message_forwarded(event_id: str, target: str, status: int) -> Any:
    """Notification: event ``event_id`` was delivered to bot target ``target``, which answered
    HTTP ``status``. May return an awaitable. Called once the delivery is recorded as done: an
    error here is logged and does not deliver again; a crash just before the record repeats the
    delivery (and this call)."""


@hookspec
def check_media(info: dict[str, Any]) -> str | None:
    """Policy: return a reason (str) to refuse an attachment before it is stored, else None.

    ``info`` has ``provider``, ``account``, ``mimetype`` (sniffed), ``declared_mimetype``,
    ``category``, ``filename``, ``type_mismatch`` (bool) and ``head`` (the first bytes, up to 8 KiB).
    A refused attachment is not stored; the message is forwarded with the reason as a note.
    """
