"""Forwarding rewritten events to bot targets (``deliver`` jobs).

Each target gets ``POST {url}`` with the rewritten envelope as JSON and these headers:

- ``X-Gateway-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` (RFC 2104) when the target
  has a ``secret``;
- ``X-Gateway-Event-Id`` and ``Idempotency-Key``: the gateway's event id (the same on every
  retry, so a bot can drop duplicates);
- ``X-Gateway-Event``: the provider's event name, made header-safe (:func:`header_value`: every
  byte outside printable ASCII, and ``%``, percent-encoded as UTF-8; at most 200 characters). The
  body keeps the name exactly as the provider sent it.

Delivery is at least once: the job is marked done in the commit right after the 2xx (the
``message_forwarded`` hooks run after that commit), so only a crash in that moment, or an answer
lost on the way back, repeats a forward, with the same ``Idempotency-Key`` and body. That commit
does not wait for the disk (the next durable commit, milliseconds later under traffic, covers
it): a power loss in between repeats the forward too.

A 2xx answer is success. 408, 425, 429, 5xx and network errors are retried with backoff; any
other 4xx sends the job to the dead letter at once (the bot refused it; retry by hand).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
from cachetools import LRUCache
import pluggy

from gateway.catalog import CatalogContract
from gateway.config import Settings
from gateway.jobs import Job, JobResult, PermanentError
from gateway.metrics import Metrics
from gateway.plugins import notify

log = logging.getLogger("gateway.delivery")

RETRYABLE_STATUS = {408, 425, 429}
HEADER_VALUE_MAX = 200  # characters of a header value taken from a provider's body
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_value(text: str, limit: int = HEADER_VALUE_MAX) -> str:
    """``text`` as a safe HTTP field value (RFC 9110 §5.5): printable ASCII kept, anything else
    (control characters, CR/LF, non-ASCII, ``%``) percent-encoded as UTF-8 (RFC 3986 §2.1), cut
    to ``limit`` characters without splitting an escape. ``message.any`` stays ``message.any``."""
    encoded = quote(text[:limit], safe=_HEADER_SAFE, errors="backslashreplace")[:limit]
    cut = encoded.rfind("%", max(0, len(encoded) - 2))
    return encoded[:cut] if cut != -1 and len(encoded) - cut < 3 else encoded


def sign_body(secret: bytes, body: bytes) -> str:
    """The ``X-Gateway-Signature`` value for ``body``: ``sha256=`` + hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class DeliveryFailed(Exception):
    """A delivery attempt failed in a way worth retrying."""


def forward_body(forward: Any) -> bytes:
    """The body a target gets: the rewritten payload as compact JSON (UTF-8)."""
    return json.dumps(forward, separators=(",", ":")).encode()


class Forwards:
    """The bodies of the events this process rewrote lately, so that their deliveries need no
    catalog read: ``event id -> (provider's event name, body)``, at most ``size`` bytes of bodies,
    the least recently used dropped first. A miss (another replica rewrote it, or it was dropped)
    reads the catalog, which stays the source of truth."""

    def __init__(self, size: int = 16 * 1024 * 1024):
        self._bodies: LRUCache[str, tuple[str, bytes]] = LRUCache(maxsize=size, getsizeof=lambda v: len(v[1]) + 1)

    def remember(self, event_id: str, event: str, forward: Any) -> None:
        """Keep the body of ``forward``, the rewritten payload of ``event_id`` (the provider's
        event name ``event``), replacing an earlier one (a body over the whole size is not kept)."""
        body = forward_body(forward)
        if len(body) < self._bodies.maxsize:
            self._bodies[event_id] = (event, body)

    def get(self, event_id: str) -> tuple[str, bytes] | None:
        """``(event name, body)`` if remembered."""
        return self._bodies.get(event_id)


class Deliverer:
    """Handler of ``deliver`` jobs (payload ``{"event_id": ..., "target": <name>}``)."""

    def __init__(self, settings: Settings, catalog: CatalogContract, http: aiohttp.ClientSession,
                 metrics: Metrics, pm: pluggy.PluginManager, forwards: Forwards | None = None):
        self.targets = {t.name: t for t in settings.targets}
        self.catalog = catalog
        self.http = http
        self.metrics = metrics
        self.pm = pm
        self.forwards = forwards if forwards is not None else Forwards()

    async def __call__(self, job: Job) -> JobResult:
        """POST the event's rewritten payload to the target. Raises to retry. On a 2xx, the
        ``message_forwarded`` hooks run as the result's ``after`` step, once the job is done."""
        event_id, name = job.payload["event_id"], job.payload["target"]
        target = self.targets.get(name)
        if target is None:
            raise PermanentError(f"target {name!r} is no longer configured")
        remembered = self.forwards.get(event_id)
        if remembered is None:
            event = await self.catalog.get_event(event_id)
            if event is None or event.get("forward") is None:
                raise PermanentError(f"event {event_id} has no rewritten payload")
            remembered = (event["event"], forward_body(event["forward"]))
        event_name, body = remembered
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "chat-media-gateway",
            "X-Gateway-Event-Id": event_id,
            "X-Gateway-Event": header_value(event_name),
            "Idempotency-Key": event_id,
        }
        if target.secret is not None:
            headers["X-Gateway-Signature"] = sign_body(target.secret.get_secret_value().encode(), body)
        try:
            async with self.http.post(str(target.url), data=body, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=target.timeout)) as resp:
                status = resp.status
                text = (await resp.content.read(500)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.deliveries.labels(name, "error").inc()
            raise DeliveryFailed(f"target {name} unreachable: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            self.metrics.deliveries.labels(name, "delivered").inc()
            log.info("event %s delivered to %s (%d)", event_id, name, status,
                     extra={"event_id": event_id, "target": name})

            async def forwarded() -> None:  # after the job is marked done: a slow hook cannot repeat it
                await notify(self.pm, "message_forwarded", event_id=event_id, target=name, status=status)
            return JobResult(after=forwarded, repeatable=True)  # a repeat: the same Idempotency-Key
        self.metrics.deliveries.labels(name, f"http_{status // 100}xx").inc()
        message = f"target {name} answered HTTP {status}: {text[:200]}"
        if 400 <= status < 500 and status not in RETRYABLE_STATUS:
            raise PermanentError(message)
        raise DeliveryFailed(message)
