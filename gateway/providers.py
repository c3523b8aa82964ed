"""The provider contract (DESIGN §4). Implementations live in ``plugins/whatsapp_*``.

A provider turns a webhook's raw body into :class:`WebhookEvent` objects, downloads the media they
reference, and rewrites the payload to point at the stored copies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp


class SignatureError(Exception):
    """The webhook's signature is missing or wrong (HTTP 401; nothing is stored)."""


class PayloadError(Exception):
    """The webhook body is not what the provider documents (HTTP 400, message names the field)."""


class FetchError(Exception):
    """A media download failed.

    ``retryable``: the next attempt may succeed (network, 5xx, file not yet/no longer there).
    ``status``: the provider's HTTP status when there was one.
    """

    def __init__(self, message: str, *, retryable: bool = True, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@dataclass(slots=True)
class MediaRef:
    """One media attachment referenced by an event.

    - ``path``: where it sits in the payload, dotted (``payload.media``, ``payload.replyTo.media``).
    - ``url``: where to fetch it, or ``None`` when the provider did not download it.
    - ``source_key``: stable across redeliveries and across events of the same message, so the
      same attachment is stored once (e.g. ``waha:default:<payload.id>:payload.media``).
    - ``mimetype``, ``filename``, ``size`` (bytes), ``sha256`` (hex): what the provider declares.
    - ``error``: why there is nothing to fetch (the event is forwarded unchanged with a note).
    """

    path: str
    url: str | None
    source_key: str
    mimetype: str | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (stored with the event)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MediaRef:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(slots=True)
class WebhookEvent:
    """One event parsed from a webhook body.

    - ``idempotency_key``: unique per event; a redelivery yields the same key.
    - ``event``: the provider's event name (``message``, ``message.any``, ...).
    - ``account``: the provider account (WAHA session, Meta ``phone_number_id``).
    - ``chat``, ``message_id``: for the catalog, when known.
    - ``payload``: the JSON object forwarded to bots (after rewriting).
    - ``media``: the attachments to store.
    """

    idempotency_key: str
    event: str
    account: str
    payload: dict[str, Any]
    media: list[MediaRef] = field(default_factory=list)
    chat: str | None = None
    message_id: str | None = None


@dataclass(slots=True)
class MediaSource:
    """An open download: ``chunks`` yields the bytes; the rest is what the provider declared.

    ``size`` in bytes (Content-Length), ``mimetype`` without parameters, ``sha256`` hex.
    """

    chunks: AsyncIterator[bytes]
    mimetype: str | None = None
    size: int | None = None
    sha256: str | None = None
    filename: str | None = None


@dataclass(slots=True)
class MediaOutcome:
    """What happened to one :class:`MediaRef`: a catalog ``record`` (dict) and ``link``, or ``error``."""

    ref: MediaRef
    record: dict[str, Any] | None = None
    link: str | None = None
    error: str | None = None


@dataclass(slots=True)
class ProviderContext:
    """Shared resources the host hands a provider in :meth:`Provider.start`."""

    http: aiohttp.ClientSession
    max_bytes: int
    fetch_timeout: aiohttp.ClientTimeout


@dataclass(slots=True)
class RouteDef:
    """An extra HTTP route a provider needs (e.g. Meta's GET verification handshake)."""

    method: str
    path: str
    handler: Any


@runtime_checkable
class Provider(Protocol):
    """A chat provider plugin object (returned by the ``register_providers`` hook).

    ``name`` is the ``{provider}`` of ``POST /webhooks/{provider}``.
    """

    name: str

    async def start(self, ctx: ProviderContext) -> None:
        """Keep the shared HTTP session; open anything else the provider needs."""

    async def close(self) -> None:
        """Release what :meth:`start` opened (not the shared session)."""

    def routes(self) -> list[RouteDef]:
        """Extra routes beyond ``POST /webhooks/{name}``."""

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check the webhook signature over the raw ``body``. Raises :class:`SignatureError`."""

    def parse(self, body: bytes) -> list[WebhookEvent]:
        """Parse a verified body into events. Raises :class:`PayloadError` (a 4xx for the sender)."""

    def fetch(self, ref: MediaRef) -> AbstractAsyncContextManager[MediaSource]:
        """Open a streamed download of ``ref``. Raises :class:`FetchError` on entry."""

    def rewrite(self, event: WebhookEvent, outcomes: list[MediaOutcome]) -> dict[str, Any]:
        """The payload to forward: each stored ref pointing at its gateway link; failures noted."""
