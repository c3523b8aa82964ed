"""Outbound media: bots send through the gateway so every outgoing file has a durable copy and the
provider always gets a link it can fetch (DESIGN §2).

:class:`Outbound` stores the copy (from a stored media id, a URL fetched under the
upload-from-URL rules of :mod:`gateway.safefetch`, or an uploaded stream), calls the provider's
``send``, and records the provider's message id on the catalog row (direction ``outbound``). The
providers' drop-in relays use the same service to store what they relay.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from gateway.catalog import CatalogContract
from gateway.links import LinkError, LinkSigner
from gateway.media import DigestMismatch, MediaTooLarge
from gateway.metrics import Metrics
from gateway.safefetch import FetchRefused, RemoteFetchError, SafeFetcher
from gateway.sdk.outbound import MediaUnavailable, Origin
from gateway.sdk.provider import (
    OutboundMedia,
    Provider,
    SendError,
    SendRequest,
    SendResult,
)
from gateway.sdk.storage import ObjectNotFound, OpenedObject, StorageBackend, StorageError
from gateway.store import MediaRefused, MediaStore

T = TypeVar("T")
log = logging.getLogger("gateway.outbound")


class Outbound:
    """The outbound service shared by ``POST /api/v1/messages`` and the providers' relays."""

    def __init__(self, catalog: CatalogContract, storage: StorageBackend, links: LinkSigner, metrics: Metrics,
                 store: MediaStore, fetcher: SafeFetcher):
        self.catalog = catalog
        self.storage = storage
        self.links = links
        self.metrics = metrics
        self.media_store = store
        self.fetcher = fetcher

    # -- storing a copy -------------------------------------------------------------------
    async def _guard(self, coro: Awaitable[T], url: str | None = None) -> T:
        try:
            return await coro
        except FetchRefused as exc:
            log.warning("media url %s refused: %s", _loggable(url), exc)
            raise MediaUnavailable(422, f"media url refused: {exc}") from exc
        except RemoteFetchError as exc:
            log.warning("could not fetch the media url %s: %s", _loggable(url), exc)
            raise MediaUnavailable(502, f"could not fetch the media url: {exc}") from exc
        except MediaTooLarge as exc:
            raise MediaUnavailable(413, str(exc)) from exc
        except (MediaRefused, DigestMismatch) as exc:
            raise MediaUnavailable(422, str(exc)) from exc
        except ObjectNotFound as exc:
            raise MediaUnavailable(404, f"the stored object is missing: {exc}") from exc
        except StorageError as exc:
            log.error("storage unavailable while storing outbound media: %s", exc)
            raise MediaUnavailable(503, f"storage unavailable: {exc}") from exc

    async def store_stream(self, chunks: AsyncIterator[bytes], origin: Origin,
                           direction: str = "outbound") -> dict[str, Any]:
        """Store an uploaded stream. Raises :class:`MediaUnavailable`."""
        record, _ = await self._guard(self.media_store.store(chunks, replace(origin, direction=direction)))
        return dict(record)

    async def store_url(self, url: str, origin: Origin, direction: str = "outbound") -> dict[str, Any]:
        """Fetch ``url`` under the upload-from-URL rules and store it; one of the gateway's own
        links (:meth:`gateway.links.LinkSigner.own_link`) is not fetched: its stored object is
        copied. Raises :class:`MediaUnavailable` (422 for a link of ours that is wrongly signed,
        expired, or public-style for an object that is not public)."""
        try:
            own = self.links.own_link(url)
        except LinkError as exc:
            log.warning("media url %s refused: a link of this gateway, but %s", _loggable(url), exc)
            raise MediaUnavailable(422, f"media url refused: a link of this gateway, but {exc}") from exc
        if own is not None:
            media_id, _, signed = own
            source = await self.catalog.get_media(media_id)
            if not signed and not (source and source.get("is_public")):
                raise MediaUnavailable(422, "media url refused: a public link of this gateway to a file "
                                            "that is not public")
            # the link is the capability: whoever holds it may read the object, whatever the tenant
            return await self.store_copy(media_id, replace(origin, source_url=url), direction=direction)

        async def _do() -> dict[str, Any]:
            async with self.fetcher.open(url) as src:
                o = replace(origin, direction=direction, source_url=url,
                            declared_mimetype=origin.declared_mimetype or src.mimetype,
                            declared_size=src.size, filename=origin.filename or src.filename)
                record, _ = await self.media_store.store(src.chunks, o)
                return dict(record)
        return await self._guard(_do(), url)

    async def store_base64(self, data: str, origin: Origin) -> dict[str, Any]:
        """Store base64 ``data`` (WAHA's ``file.data``; a ``data:`` URL prefix is allowed)."""
        if data.startswith("data:") and "," in data:
            data = data.split(",", 1)[1]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MediaUnavailable(422, "file.data is not valid base64") from None

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), 1024 * 1024):
                yield raw[i:i + 1024 * 1024]
        return await self.store_stream(chunks(), origin)

    async def store_copy(self, media_id: str, origin: Origin, tenant: str | None = None,
                         direction: str = "outbound") -> dict[str, Any]:
        """A new object copied from stored media ``media_id`` (its own row and lifetime).

        A key bound to a tenant sees only that tenant's media (else: 404)."""
        source = await self.catalog.get_media(media_id)
        if source is None or source.get("state", "stored") != "stored" or (
                tenant is not None and source.get("tenant") != tenant):
            raise MediaUnavailable(404, f"no media with id {media_id!r}")

        async def _do() -> dict[str, Any]:
            obj = await self.storage.open(source["key"], bucket=source["bucket"])
            try:
                o = replace(origin, direction=direction, declared_mimetype=source["mimetype"],
                            declared_sha256=source["sha256"], filename=origin.filename or source["filename"])
                copy, _ = await self.media_store.store(obj.chunks, o)
                return dict(copy)
            finally:
                await obj.close()
        return await self._guard(_do())

    # -- sending --------------------------------------------------------------------------
    def outbound_media(self, record: dict[str, Any]) -> OutboundMedia:
        """The provider's view of a stored object: row, signed link, and an opener."""
        async def opener(start: int | None, end: int | None) -> OpenedObject:
            return await self.storage.open(record["key"], start, end, bucket=record["bucket"])
        return OutboundMedia(record=record, link=self.links.link(record["id"], record["filename"]), open=opener)

    async def send(self, provider: Provider, request: SendRequest) -> SendResult:
        """The provider's send, counted; the message id recorded on the media row.

        Raises :class:`gateway.sdk.provider.SendError` (and ``SendRefused``); a refused send's copy
        is removed first (see :meth:`discard_refused`)."""
        try:
            result = await provider.send(request)
        except SendError as exc:
            self.count_send(provider.name, request.type, exc.status)
            log.warning("send via %s failed (%s): %s", provider.name, exc.status, exc,
                        extra={"provider": provider.name, "media_id": request.media.record["id"]})
            await self.discard_refused(request.media.record, exc.status)
            raise
        self.count_send(provider.name, request.type, 200)
        await self.mark_sent(request.media.record["id"], request.to, result.provider_message_id)
        return result

    async def discard_refused(self, record: dict[str, Any], status: int) -> None:
        """Remove the outbound copy ``record`` when its send was refused (HTTP 4xx: our own
        checks of the provider's limits, or the provider's refusal), so that a refused send
        leaves nothing stored. After a 5xx or an unreachable provider the copy stays: the
        provider may still fetch its link, and the bot may retry."""
        if not 400 <= status < 500:
            return
        try:
            await self.media_store.delete(record["id"])
        except StorageError as exc:
            log.warning("could not remove the copy of a refused send %s: %s (the next cleanup does)",
                        record["key"], exc, extra={"media_id": record["id"]})

    async def mark_sent(self, media_id: str, chat: str | None, message_id: str | None) -> None:
        """Record the chat and the provider's message id on an outbound row."""
        await self.catalog.update_media(media_id, {"chat": chat, "message_id": message_id})

    def count_send(self, provider: str, media_type: str, status: int) -> None:
        """Count one send (API or relay) by the HTTP status it ended with."""
        outcome = ("sent" if status < 300 else "refused" if status == 422
                   else "unreachable" if status == 502 else "error")
        self.metrics.outbound_sends.labels(provider, media_type, outcome).inc()

    def count_fallback(self, provider: str) -> None:
        """A relay forwarded the original media because storing failed."""
        self.metrics.relay_fallbacks.labels(provider).inc()


def _loggable(url: str | None) -> str:
    """``url`` for the log: scheme, host and path only (a query may carry a signature or token)."""
    if not url:
        return "(none)"
    return url.split("?", 1)[0].split("#", 1)[0][:300]
