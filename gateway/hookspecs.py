"""Every pluggy hook of the gateway, in one place (DESIGN §4).

Plugins implement hooks with :data:`gateway.sdk.hookimpl` and register through the entry-point
group ``gateway`` in their ``pyproject.toml``::

    [project.entry-points.gateway]
    my_plugin = "my_package.plugin_module"

pluggy is synchronous: hooks return objects, and the host awaits what needs awaiting (a hook may
return a coroutine or another awaitable where noted: datasette's ``await_me_maybe`` pattern).

Kinds of hooks:

- discovery: :func:`register_providers`, :func:`register_storage`, :func:`settings_sections`,
  :func:`register_routes`. Two plugins offering one provider or storage name stop the daemon at
  start with an error naming both plugins;
- lifecycle: :func:`startup`, :func:`shutdown`;
- notifications: :func:`media_stored`, :func:`media_updated`, :func:`media_deleted`,
  :func:`message_forwarded`. They run after the operation is committed, each implementation on
  its own (:func:`gateway.plugins.notify`): one that raises is logged in one line naming its
  plugin and never fails or undoes the operation, nor stops the other listeners;
- policy: :func:`check_media` (may be async, e.g. a virus scan) refuses an attachment before it is
  stored.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypedDict

import pluggy

if TYPE_CHECKING:
    from aiohttp import web
    from pydantic import BaseModel

    from gateway.config import Settings
    from gateway.sdk.provider import Provider
    from gateway.sdk.storage import StorageBackend

__all__ = ["PROJECT", "MediaInfo", "MediaRecord", "hookimpl", "hookspec"]

# The markers and the hooks' record types are defined here, beside the specs, and re-exported to
# plugins by gateway.sdk.hooks: this module imports nothing from the gateway at run time, so the
# host's plugin manager and the SDK both build on it without a cycle.

PROJECT = "gateway"
"""The pluggy project name and the entry-point group (``[project.entry-points.gateway]``)."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class MediaInfo(TypedDict):
    """What the ``check_media`` policy hook sees of an attachment before it is stored.

    ``mimetype``: the sniffed MIME type; ``declared_mimetype``: what the sender said (or
    ``None``); ``category``: one of ``CATEGORIES``; ``type_mismatch``: the two disagree;
    ``head``: the first bytes of the content (up to 8 KiB).
    """

    provider: str
    account: str
    mimetype: str
    declared_mimetype: str | None
    category: str
    filename: str
    type_mismatch: bool
    head: bytes


MediaRecord = dict[str, Any]
"""A media object's catalog row, as the notification hooks receive it: ``id``, ``sha256`` (hex),
``size`` (bytes), ``mimetype``, ``category``, ``filename``, ``backend``, ``bucket``, ``key``,
``provider``, ``account``, ``direction``, ``created_at``, ``expires_at`` ..."""



@hookspec
def register_providers(settings: Settings) -> list[Provider] | None:
    """Return the provider objects (:class:`gateway.sdk.Provider`) this plugin offers for
    ``settings``, e.g. only when ``[providers.<name>]`` is present and enabled. Validate your
    section with :func:`gateway.sdk.plugin_settings` so a bad value stops the daemon with the
    setting's name. Constructing must not do I/O. A name another plugin offers too stops the
    daemon at start (the error names both plugins).
    """


@hookspec
def settings_sections() -> dict[str, type[BaseModel]] | None:
    """Return the settings sections this plugin owns, as ``{"<table>.<name>": model}`` with
    ``<table>`` ``providers`` or ``storage`` and ``model`` a :class:`gateway.sdk.PluginSection`
    subclass, e.g. ``{"providers.waha": WahaSettings}``. At start the host refuses sections that no
    plugin owns (a typo such as ``[storage.lcoal]``) and validates every present section with its
    model, so unknown keys inside it are refused too.
    """


@hookspec
def register_storage(settings: Settings) -> list[StorageBackend] | None:
    """Return storage backend objects (:class:`gateway.sdk.StorageBackend`). The host uses the
    one whose ``name`` equals ``settings.storage.backend``; return yours only when selected.
    Constructing must not do I/O: open resources in the backend's ``start()``. A name another
    plugin offers too stops the daemon at start (the error names both plugins).
    """


@hookspec
def register_routes(app: web.Application) -> None:
    """Add extra HTTP routes to the aiohttp ``app`` (called before the app starts)."""


@hookspec
def startup(app: web.Application) -> Awaitable[None] | None:
    """Called once the app's resources are open. May return an awaitable."""


@hookspec
def shutdown(app: web.Application) -> Awaitable[None] | None:
    """Called before the app's resources close. May return an awaitable."""


@hookspec
def media_stored(record: MediaRecord) -> Awaitable[None] | None:
    """Notification, after commit: a media object was stored; ``record`` is its catalog row
    (:data:`gateway.sdk.hooks.MediaRecord`). Return value ignored; may return an awaitable; an
    exception is logged, not raised."""


@hookspec
def media_updated(record: MediaRecord) -> Awaitable[None] | None:
    """Notification, after commit: a media object's catalog row changed (filename, metadata,
    is_public, expires_at through the files API); ``record`` is the new row. May return an
    awaitable; an exception is logged, not raised."""


@hookspec
def media_deleted(record: MediaRecord) -> Awaitable[None] | None:
    """Notification, after commit: a media object and its row were deleted (files API or
    retention cleanup); ``record`` is the row as it was. May return an awaitable; an exception is
    logged, not raised."""


@hookspec
def message_forwarded(event_id: str, target: str, status: int) -> Awaitable[None] | None:
    """Notification: event ``event_id`` was delivered to bot target ``target``, which answered
    HTTP ``status``. May return an awaitable. Called once the delivery is recorded as done: an
    error here is logged and does not deliver again; a crash just before the record repeats the
    delivery (and this call)."""


@hookspec
def check_media(info: MediaInfo) -> str | None | Awaitable[str | None]:
    """Policy: return a reason (str) to refuse an attachment before it is stored, else None.

    May be async (return a coroutine or another awaitable resolving to the reason or None, e.g. a
    virus scan): the host awaits it, so nothing slow runs on the event loop's critical path.
    ``info`` (:class:`gateway.sdk.hooks.MediaInfo`) has ``provider``, ``account``, ``mimetype``
    (sniffed), ``declared_mimetype``, ``category``, ``filename``, ``type_mismatch`` (bool) and
    ``head`` (the first bytes, up to 8 KiB). A refused attachment is not stored; the message is
    forwarded with the reason as a note. An exception propagates (the attachment is not stored).
    """
