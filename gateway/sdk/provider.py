"""The provider contract (DESIGN §4). Implementations live in ``plugins/whatsapp_*``.

A provider turns a webhook's raw body into :class:`WebhookEvent` objects, downloads the media they
reference, and rewrites the payload to point at the stored copies.

The helpers here are the shared defences every provider uses on hostile input:
:func:`load_json` (a depth limit, :data:`MAX_JSON_DEPTH`), :func:`storable` (the strings kept
from a body can be stored and logged), :func:`signature_matches` (a constant-time comparison
that any header value survives) and :func:`copy_path` (a rewrite copies only what it changes).

Keys are global. Every provider's events share one catalog and one queue, so each
``WebhookEvent.idempotency_key`` and each ``MediaRef.source_key`` must be unique across all
providers, not only within one: prefix both with the provider's ``name``
(``waha:<session>:<id>``, ``meta:<wamid>``). Two providers that produced the same key would
silently drop each other's events or share each other's stored media.

Providers are tested by the shared contract suite :mod:`gateway.sdk.testing` (a pytest plugin).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiohttp
from aiohttp import web

from gateway.sdk.storage import OpenedObject

if TYPE_CHECKING:
    from gateway.sdk.download import DownloadPolicy
    from gateway.sdk.outbound import OutboundService


class SignatureError(Exception):
    """The webhook's signature is missing or wrong (HTTP 401; nothing is stored)."""


class PayloadError(Exception):
    """The webhook body is not what the provider documents (HTTP 400, message names the field)."""


MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects a webhook body may have (the top-level object is
level 1). WAHA's and Meta's documented payloads stay under 10; a deeper body is refused with 400
before anything is stored, so nothing downstream (catalog, rewrite, delivery) recurses deeply."""


def load_json(body: bytes) -> Any:
    """Decode a webhook body (RFC 8259 JSON, UTF-8) at most :data:`MAX_JSON_DEPTH` levels deep.

    Raises :class:`PayloadError` for a body that is not JSON or is nested deeper (the
    interpreter's own limit, about 1,000 levels, is caught too). Strings may hold lone surrogates
    (``"\\ud800"`` is valid JSON): pass what you keep through :func:`storable`.
    """
    try:
        data = json.loads(body)
    except RecursionError:
        raise PayloadError(f"body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    opening = (b"{", b"[") if isinstance(body, (bytes, bytearray)) else ("{", "[")  # json.loads takes str too
    if body.count(opening[0]) + body.count(opening[1]) <= MAX_JSON_DEPTH:
        return data  # each level opens one: so few cannot nest deeper (the common case, in C)
    stack: list[tuple[Any, int]] = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:  # iterative: a deep body cannot exhaust the stack here
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_JSON_DEPTH:
                    raise PayloadError(f"body is nested deeper than {MAX_JSON_DEPTH} levels")
                stack.append((child, depth + 1))
    return data


def storable(text: str) -> str:
    """``text`` if it encodes as UTF-8, else with each lone surrogate (U+D800..U+DFFF, which JSON
    escapes can carry but SQLite, logs and headers cannot) written as the escape ``\\udXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _storable_or_none(value: Any) -> Any:
    return storable(value) if isinstance(value, str) else value


def signature_matches(expected: str, given: str) -> bool:
    """Constant-time ``expected == given`` (RFC 2104 §5 advice) for any header value, non-ASCII
    included (``hmac.compare_digest`` refuses non-ASCII ``str`` with ``TypeError``): both sides
    are compared as UTF-8 bytes, lone surrogates passed through."""
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"),
                               given.encode("utf-8", "surrogatepass"))


def copy_path(root: dict[str, Any], path: Sequence[str | int]) -> tuple[dict[str, Any], Any]:
    """A shallow copy of ``root`` in which every container along ``path`` (keys and list
    indexes) is a fresh shallow copy too, and that copy of the container at the end of ``path``.

    The end is ``None`` when the path does not lead through dicts and lists. Nothing else is
    copied, so a rewrite costs the path's length and no recursion, however deep the payload.
    """
    new_root = dict(root)
    parent: Any = new_root
    for key in path:
        try:
            child = parent[key]
        except (KeyError, IndexError, TypeError):
            return new_root, None
        if isinstance(child, dict):
            child = dict(child)
        elif isinstance(child, list):
            child = list(child)
        else:
            return new_root, None
        parent[key] = child
        parent = child
    return new_root, parent


class FetchError(Exception):
    """A media download failed.

    ``retryable``: the next attempt may succeed (network, 5xx, file not yet/no longer there).
    ``status``: the provider's HTTP status when there was one.
    ``reason``: a short, bounded label for metrics (``auth``, ``unknown_media``, ``url_expired``...);
    default ``http_<status>`` or ``fetch``.
    """

    def __init__(self, message: str, *, retryable: bool = True, status: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.reason = reason or (f"http_{status}" if status else "fetch")


class SendError(Exception):
    """An outbound send failed. ``status`` is the HTTP status to answer the bot with (the
    provider's own for a provider 4xx, 502 when it was unreachable); ``body`` is the provider's
    answer (JSON-able) or a message."""

    def __init__(self, status: int, body: Any):
        super().__init__(body if isinstance(body, str) else f"provider answered {status}")
        self.status = status
        self.body = body


class SendRefused(SendError):
    """The media breaks the provider's documented limits (type, size, codec): HTTP 422, and
    nothing was sent."""

    def __init__(self, message: str):
        super().__init__(422, message)


@dataclass(slots=True)
class MediaRef:
    """One media attachment referenced by an event.

    - ``path``: where it sits in the payload, dotted (``payload.media``, ``payload.replyTo.media``).
    - ``url``: where to fetch it (``None`` when the provider fetches by id, see ``extra``).
    - ``source_key``: stable across redeliveries and across events of the same message, so the
      same attachment is stored once (e.g. ``waha:default:<payload.id>:payload.media``); unique
      across providers: it starts with the provider's name and ``:``.
    - ``mimetype``, ``filename``, ``size`` (bytes), ``sha256`` (hex): what the provider declares.
    - ``error``: why there is nothing to fetch (the event is forwarded unchanged with a note).
    - ``extra``: provider-specific (Meta: ``media_id``, ``phone_number_id``).

    Its strings (and ``extra``'s string values) pass through :func:`storable`.
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

    def __post_init__(self) -> None:
        for name in ("path", "url", "source_key", "mimetype", "filename", "sha256", "error"):
            setattr(self, name, _storable_or_none(getattr(self, name)))
        self.extra = {k: _storable_or_none(v) for k, v in self.extra.items()}

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

    - ``idempotency_key``: unique per event across all providers (it starts with the provider's
      name and ``:``); a redelivery yields the same key.
    - ``event``: the provider's event name (``message``, ``message.any``, ...).
    - ``account``: the provider account (WAHA session, Meta ``phone_number_id``).
    - ``chat``, ``message_id``: for the catalog, when known.
    - ``payload``: the JSON object forwarded to bots (after rewriting).
    - ``media``: the attachments to store.

    The strings (not ``payload``, which is stored as escaped JSON) pass through :func:`storable`.
    """

    idempotency_key: str
    event: str
    account: str
    payload: dict[str, Any]
    media: list[MediaRef] = field(default_factory=list)
    chat: str | None = None
    message_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("idempotency_key", "event", "account", "chat", "message_id"):
            setattr(self, name, _storable_or_none(getattr(self, name)))


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


OUTBOUND_TYPES = ("image", "video", "audio", "voice", "document", "sticker")


@dataclass(slots=True)
class OutboundMedia:
    """A stored object to send.

    ``record``: its catalog row (``id``, ``mimetype``, ``size`` in bytes, ``filename``, ...);
    ``link``: a signed gateway URL the provider can fetch; ``open(start, end)``: streams the bytes
    (inclusive range, both ``None`` for all) as a :class:`gateway.sdk.storage.OpenedObject`.
    """

    record: dict[str, Any]
    link: str
    open: Callable[[int | None, int | None], Awaitable[OpenedObject]]


@dataclass(slots=True)
class SendRequest:
    """One outbound media message: to chat ``to`` from ``account`` (WAHA session, Meta
    ``phone_number_id``), ``type`` one of :data:`OUTBOUND_TYPES`; ``by`` asks Meta-style
    providers to send by uploaded ``id`` or by ``link`` (``None``: the provider's setting);
    ``convert`` lets a provider that can (WAHA) convert audio/video it would otherwise refuse."""

    account: str
    to: str
    type: str
    media: OutboundMedia
    caption: str | None = None
    filename: str | None = None
    by: str | None = None
    convert: bool = False


@dataclass(slots=True)
class SendResult:
    """The provider's message id and its whole answer."""

    provider_message_id: str
    response: Any


@dataclass(slots=True)
class ProviderContext:
    """Shared resources the host hands a provider in :meth:`Provider.start`: the HTTP session,
    limits (``max_bytes``: the largest media object, bytes), ``outbound``
    (:class:`gateway.sdk.outbound.OutboundService`) for relays that store media, and
    ``download`` (:class:`gateway.sdk.download.DownloadPolicy`): media downloads use its ``timeout``
    and read bodies with :func:`gateway.sdk.download.resumable_body` (idle and total timeouts,
    ``Range`` resume)."""

    http: aiohttp.ClientSession
    max_bytes: int
    fetch_timeout: aiohttp.ClientTimeout
    outbound: OutboundService | None = None
    download: DownloadPolicy | None = None


@dataclass(slots=True)
class RouteDef:
    """An extra HTTP route a provider needs (e.g. Meta's GET verification handshake).

    ``method`` may be ``"*"`` (any); ``path`` is an aiohttp template (``{name}`` or
    ``{name:regex}``). ``summary`` is the one line ``/openapi.json`` shows for it: such routes speak
    the provider's own API and are described as pass-through operations.
    """

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str = ""


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
        """Parse a verified body into events. Raises :class:`PayloadError` (a 4xx for the sender).

        Each event's ``idempotency_key`` and each ref's ``source_key`` start with ``<name>:`` (keys
        are unique across providers; see the module docstring)."""

    def fetch(self, ref: MediaRef) -> AbstractAsyncContextManager[MediaSource]:
        """Open a streamed download of ``ref``. Raises :class:`FetchError` on entry, and from
        ``chunks`` when the body breaks or stalls part-way (the host also treats an aiohttp
        error or ``TimeoutError`` from ``chunks`` as a retryable :class:`FetchError`)."""

    def rewrite(self, event: WebhookEvent, outcomes: list[MediaOutcome]) -> dict[str, Any]:
        """The payload to forward: each stored ref pointing at its gateway link; failures noted."""

    async def send(self, request: SendRequest) -> SendResult:
        """Send stored media to a chat. Raises :class:`SendRefused` (422) before sending anything
        the provider would refuse, :class:`SendError` for provider errors."""
