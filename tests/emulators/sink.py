"""A bot sink: an aiohttp app that records every webhook the gateway forwards to it.

``fail_next`` makes the next N deliveries answer ``fail_status`` (default 500).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class Delivery:
    """One received POST: its headers, raw body and decoded JSON."""

    headers: dict[str, str]
    body: bytes
    json: Any


class BotSink:
    """Records deliveries at ``POST /hook`` (and any other path)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.fail_next = 0
        self.fail_status = 500
        self.attempts = 0
        self._changed = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/{tail:.*}", self._receive)

    async def _receive(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": "sink told to fail"}, status=self.fail_status)
        self.deliveries.append(Delivery(dict(request.headers), body, await request.json()))
        self._changed.set()
        return web.json_response({"ok": True})

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Wait until at least ``count`` deliveries arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"sink got {len(self.deliveries)} of {count} deliveries")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return self.deliveries


def main() -> None:
    """Run a sink that prints every delivery. ``GET /last`` answers the last one as JSON, waiting
    up to ``timeout`` seconds (default 30) for a first one; ``GET /last?event_id=ev_...`` waits for
    the delivery of that event (its ``X-Gateway-Event-Id``), so a script can read what the gateway
    forwarded right after posting the webhook. 404 when nothing came in time."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="bot sink: prints what the gateway forwards")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    sink = BotSink()

    def find(event_id: str | None) -> Delivery | None:
        for delivery in reversed(sink.deliveries):
            if event_id is None or delivery.headers.get("X-Gateway-Event-Id") == event_id:
                return delivery
        return None

    async def last(request: web.Request) -> web.Response:
        event_id = request.query.get("event_id")
        try:
            timeout = float(request.query.get("timeout", "30"))
        except ValueError:
            return web.json_response({"error": "timeout: a number of seconds"}, status=400)
        deadline = time.monotonic() + timeout
        while True:
            sink._changed.clear()  # before looking, so that a delivery in between wakes the wait
            found = find(event_id)
            remaining = deadline - time.monotonic()
            if found is not None or remaining <= 0:
                break
            try:
                await asyncio.wait_for(sink._changed.wait(), remaining)
            except TimeoutError:
                pass
        if found is None:
            what = f"event {event_id}" if event_id else "any delivery"
            return web.json_response({"error": f"nothing received for {what} within {timeout:g} s"}, status=404)
        return web.json_response(found.json)

    async def show(request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "POST" and sink.deliveries:
            print(json.dumps(sink.deliveries[-1].json, indent=2), flush=True)

    sink.app.router.add_get("/last", last)
    sink.app.on_response_prepare.append(show)
    print(f"bot sink on http://{args.host}:{args.port}/hook (GET /last for the last delivery)", flush=True)
    web.run_app(sink.app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
