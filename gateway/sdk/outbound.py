"""The outbound interface (DESIGN §2, §4): what a provider's relay may ask of the host.

A provider gets an :class:`OutboundService` as ``ProviderContext.outbound`` in
:meth:`gateway.sdk.provider.Provider.start`. The host's implementation is
``gateway.outbound.Outbound``; a plugin never imports it, it only calls the methods below.

Records (``dict[str, Any]``) are catalog rows: ``id``, ``key``, ``bucket``, ``sha256``, ``size``
(bytes), ``mimetype``, ``category``, ``filename``, ``provider``, ``direction`` ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gateway.sdk.provider import OutboundMedia


class MediaUnavailable(Exception):
    """The media to send could not be had. ``status``: the HTTP status to answer (404 unknown id,
    413 too large, 422 refused URL or type, 502 remote fetch failed, 503 storage down)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Origin:
    """Where a stream comes from, for the catalog row.

    ``direction``: ``inbound``, ``outbound`` or ``upload``; ``source_key``: the idempotency key of the
    attachment (``None`` for one-off uploads); ``declared_*``: what the sender said
    (``declared_category``: one of :data:`gateway.sdk.CATEGORIES`; like a declared type it never
    decides the category, and contradicting the content is a type mismatch).
    """

    provider: str
    account: str
    direction: str = "inbound"
    chat: str | None = None
    message_id: str | None = None
    event_id: str | None = None
    source_key: str | None = None
    source_url: str | None = None
    declared_mimetype: str | None = None
    declared_size: int | None = None
    declared_sha256: str | None = None
    declared_category: str | None = None
    filename: str | None = None
    tenant: str | None = None
    is_public: bool = False
    expires_at: float | None = None  # epoch seconds; retention deletes the object after it
    metadata: dict[str, Any] | None = None  # the caller's own, kept in the row's extra


@runtime_checkable
class OutboundService(Protocol):
    """The host's outbound service, as a provider's relay sees it.

    Every ``store_*`` method stores a durable copy through the host's one storing path (hash,
    size limit, sniffing, policy hooks, object key, catalog row) and returns the new catalog row;
    each raises :class:`MediaUnavailable` with the HTTP status to answer when it cannot.
    """

    async def store_stream(self, chunks: AsyncIterator[bytes], origin: Origin,
                           direction: str = "outbound") -> dict[str, Any]:
        """Store an uploaded stream. Raises :class:`MediaUnavailable`."""

    async def store_url(self, url: str, origin: Origin, direction: str = "outbound") -> dict[str, Any]:
        """Fetch ``url`` under the upload-from-URL rules (SSRF-safe) and store it; one of the
        gateway's own links is copied, not fetched. Raises :class:`MediaUnavailable`."""

    async def store_base64(self, data: str, origin: Origin) -> dict[str, Any]:
        """Store base64 ``data`` (RFC 4648; a ``data:`` URL prefix is allowed). Raises
        :class:`MediaUnavailable` (422 for data that is not base64)."""

    def outbound_media(self, record: dict[str, Any]) -> OutboundMedia:
        """The provider's view of a stored object: its row, a signed gateway link and an opener."""

    async def mark_sent(self, media_id: str, chat: str | None, message_id: str | None) -> None:
        """Record the chat and the provider's message id on an outbound row."""

    async def discard_refused(self, record: dict[str, Any], status: int) -> None:
        """Remove the outbound copy ``record`` when its send was refused (HTTP 4xx), so a refused
        send leaves nothing stored; after a 5xx the copy stays."""

    def count_send(self, provider: str, media_type: str, status: int) -> None:
        """Count one send (API or relay) by the HTTP status it ended with."""

    def count_fallback(self, provider: str) -> None:
        """Count a relay that forwarded the original media because storing failed."""
