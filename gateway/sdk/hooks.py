"""The pluggy markers of the ``gateway`` project (DESIGN §4).

A plugin marks its hook implementations with :data:`hookimpl`; the hook specifications
(:mod:`gateway.hookspecs`) are marked with :data:`hookspec`. Both belong to the project name
:data:`PROJECT`, which is also the entry-point group plugins register under.
"""

from __future__ import annotations

from typing import Any, TypedDict

import pluggy

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
