"""Live notices of catalog changes: ``GET /api/v1/events`` (a WebSocket).

:class:`Notifier` is registered as a pluggy plugin: the ``media_stored``, ``media_updated`` and
``media_deleted`` hooks become ``created``, ``updated`` and ``deleted`` notices, each delivered to
the subscribers whose API key may see the object (same tenant, or a key without a tenant). A
subscriber that falls ``QUEUE_SIZE`` notices behind is dropped rather than slowing the gateway.

Notices cross replicas: a hook publishes on the catalog's channel :data:`CHANNEL`
(:meth:`gateway.catalog.CatalogContract.publish`; PostgreSQL ``NOTIFY``), and every replica's
notifier fans out what it receives there (:meth:`Notifier.start`) to its own subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.catalog import CatalogContract
from gateway.hookspecs import hookimpl
from gateway.keys import NOTIFIER
from gateway.web.auth import Principal, require

QUEUE_SIZE = 1000
CHANNEL = "gateway_media"
"""The catalog channel media notices travel on, between replicas."""

log = logging.getLogger("gateway.web.events")


class Subscription:
    """One listener: ``queue`` yields notices ``{"type", "file"}``; ``overflowed`` once dropped."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False


class Notifier:
    """Fans media notices out to subscriptions. ``view(record)`` turns a catalog row into the
    JSON object a notice carries; notices travel through ``catalog``'s channel :data:`CHANNEL`
    between :meth:`start` and :meth:`stop`."""

    def __init__(self, view: Callable[[dict[str, Any]], dict[str, Any]], catalog: CatalogContract) -> None:
        self.view = view
        self.catalog = catalog
        self._subs: set[Subscription] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        """Receive the notices of every replica (call once the catalog is open)."""
        notices = await self._stack.enter_async_context(self.catalog.subscribe(CHANNEL))

        async def fan_out() -> None:
            async for notice in notices:
                self.publish(notice["type"], notice["record"])

        self._listener = asyncio.create_task(fan_out(), name="events-listener")

    async def stop(self) -> None:
        """Stop receiving and sending notices."""
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener = None
        await self._stack.aclose()

    def _send(self, kind: str, record: dict[str, Any]) -> None:
        """Publish a ``kind`` notice about ``record`` to every replica's notifier (this one too)."""
        async def send() -> None:
            try:
                await self.catalog.publish(CHANNEL, {"type": kind, "record": record})
            except Exception as exc:  # a live notice, not a record: lost, the catalog is not
                log.warning("could not send a %s notice for %s: %s", kind, record.get("id"), exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def subscribe(self, principal: Principal) -> Subscription:
        """A new subscription for a caller."""
        sub = Subscription(principal)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a subscription."""
        self._subs.discard(sub)

    def publish(self, kind: str, record: dict[str, Any]) -> None:
        """Queue a ``kind`` notice about ``record`` for every subscription that may see it."""
        notice = None
        for sub in list(self._subs):
            tenant = sub.principal.tenant
            if tenant is not None and record.get("tenant") != tenant:
                continue
            notice = notice or {"type": kind, "file": self.view(record)}
            try:
                sub.queue.put_nowait(notice)
            except asyncio.QueueFull:
                sub.overflowed = True
                self._subs.discard(sub)
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)  # wake the reader so it can close

    @hookimpl
    def media_stored(self, record: dict[str, Any]) -> None:
        self._send("created", record)

    @hookimpl
    def media_updated(self, record: dict[str, Any]) -> None:
        self._send("updated", record)

    @hookimpl
    def media_deleted(self, record: dict[str, Any]) -> None:
        self._send("deleted", record)


async def events(request: web.Request) -> web.WebSocketResponse:
    """``GET /events`` (WebSocket): ``{"type": "created"|"updated"|"deleted", "file": FileInfo}``
    for every object the key may see. A listener that falls far behind is closed (code 1013)."""
    principal = require(request, "read")
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    sub = request.app[NOTIFIER].subscribe(principal)

    async def drain_incoming() -> None:
        async for _ in ws:  # the client says nothing we need; this notices it closing
            pass

    reader = asyncio.create_task(drain_incoming())
    try:
        while not ws.closed:
            getter = asyncio.ensure_future(sub.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            notice = getter.result()
            if notice is None:
                await ws.close(code=1013, message=b"too far behind")
                break
            await ws.send_json(notice)
    finally:
        request.app[NOTIFIER].unsubscribe(sub)
        reader.cancel()
        await ws.close()
    return ws
