"""``POST /webhooks/{provider}``: a provider's webhook, verified, parsed and committed."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.catalog import ReadyEvent
from gateway.catalog.rows import new_event_id
from gateway.keys import CATALOG, INGESTOR, METRICS, PROVIDERS, QUEUE, SETTINGS
from gateway.sdk.provider import PayloadError, SignatureError
from gateway.web.errors import ApiError

if TYPE_CHECKING:
    from gateway.ingest import Ingestor

log = logging.getLogger("gateway.http")


async def webhook(request: web.Request) -> web.Response:
    """``POST /webhooks/{provider}``: verify, parse, commit events and jobs, then answer 200.

    401 bad signature, 400 bad body, 404 unknown provider, 413 too large, 503 catalog unavailable
    or, for a webhook with media, the fetch lane too far behind to store it before the provider
    deletes it (``Retry-After``, :mod:`gateway.admission`); the provider retries. Nothing is stored
    unless the answer is 200.
    """
    name = request.match_info["provider"]
    provider = request.app[PROVIDERS].get(name)
    metrics = request.app[METRICS]
    if provider is None:
        raise ApiError(404, f"unknown provider {name!r}", providers=sorted(request.app[PROVIDERS].keys()))
    limit = request.app[SETTINGS].server.max_webhook_bytes
    if request.content_length is not None and request.content_length > limit:
        metrics.webhook_outcome(name, "too_large")
        raise ApiError(413, f"webhook body over the limit of {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.webhook_outcome(name, "too_large")
        raise ApiError(413, f"webhook body over the limit of {limit} bytes")
    try:
        provider.verify(request.headers, body)
    except SignatureError as exc:
        metrics.webhook_outcome(name, "unauthorized")
        log.warning("%s webhook refused: %s (from %s)", name, exc, request.remote,
                    extra={"provider": name})
        raise ApiError(401, str(exc))
    try:
        events = provider.parse(body)
    except PayloadError as exc:
        metrics.webhook_outcome(name, "invalid")
        log.warning("%s webhook invalid: %s", name, exc, extra={"provider": name})
        raise ApiError(400, str(exc))
    if any(ev.media for ev in events):
        retry_after = await request.app[QUEUE].admission.admit(name, sum(1 for ev in events if ev.media))
        if retry_after is not None:
            metrics.webhook_outcome(name, "held_back", len(events))
            raise ApiError(503, "the gateway is behind on storing media; retry later",
                           headers={"Retry-After": str(retry_after)}, retry_after=retry_after)
    event_ids = [new_event_id() for _ in events]
    ready: dict[int, ReadyEvent] = {}
    ingestor = request.app.get(INGESTOR)
    if ingestor is not None:  # events without media skip the ingest job: their deliveries are queued now
        for i, (event, event_id) in enumerate(zip(events, event_ids)):
            if (handled := ingestor.without_media(provider, event, event_id)) is not None:
                ready[i] = handled
    queue = request.app[QUEUE]
    jobs: Counter[str] = Counter()
    for i in range(len(events)):
        handled = ready.get(i)
        jobs.update(["ingest"] if handled is None else [kind for kind, _, _ in handled.followups])
    handoff = queue.reserve(jobs)  # idle workers take the jobs straight from the commit
    begun: dict[str, asyncio.Future[bool]] = {}
    if ingestor is not None and "ingest" in handoff.kinds:  # their downloads start during the commit
        begun = {event_id: ingestor.begin(provider, event, event_id)
                 for i, (event, event_id) in enumerate(zip(events, event_ids)) if i not in ready}
    try:
        accepted, duplicates, claimed = await request.app[CATALOG].record_webhook(
            name, body, events, event_ids=event_ids, ready=ready, claim=handoff.kinds)
    except BaseException as exc:
        queue.hand(handoff, [])  # the reservation ends, with nothing to hand
        _settle(ingestor, begun, ())
        if not isinstance(exc, Exception):  # cancelled (shutdown)
            raise
        metrics.webhook_outcome(name, "unavailable")
        log.exception("could not commit a %s webhook; answering 503 so the provider retries", name,
                      extra={"provider": name})
        raise ApiError(503, "catalog unavailable, retry later")
    _settle(ingestor, begun, accepted)
    index = {event_id: i for i, event_id in enumerate(event_ids)}
    if ingestor is not None:  # its ingest job takes the event from memory, not the catalog
        for event_id in accepted:
            if index[event_id] not in ready:
                ingestor.arrivals.remember(event_id, name, events[index[event_id]], len(body),
                                           count_sources=event_id not in begun)
    queue.hand(handoff, claimed)
    kinds: set[str] = set()  # wake the lanes that have new jobs queued
    for event_id in accepted:
        handled = ready.get(index[event_id])
        kinds |= {"ingest"} if handled is None else {kind for kind, _, _ in handled.followups}
    if kinds - handoff.kinds:
        queue.notify(kinds - handoff.kinds)
    metrics.webhook_outcome(name, "accepted", len(accepted))
    metrics.webhook_outcome(name, "duplicate", len(duplicates))
    for event_id in accepted:
        log.info("%s webhook accepted", name, extra={"provider": name, "event_id": event_id})
    return web.json_response({"accepted": len(accepted), "duplicates": len(duplicates),
                              "event_ids": accepted})


def _settle(ingestor: Ingestor | None, begun: dict[str, asyncio.Future[bool]], accepted: Collection[str]) -> None:
    """Tell the media storing begun during the commit (:meth:`Ingestor.begin`) whether its event
    was committed; the others' is abandoned."""
    for event_id, committed in begun.items():
        committed.set_result(event_id in accepted)
        if event_id not in accepted and ingestor is not None:
            ingestor.abandon(event_id)
