"""Fault run: how often a SIGKILL repeats a forward (delivery is at least once, README "What a bot
receives").

A gateway daemon (``tests.daemon.GatewayProcess``, local storage, 4 workers) is fed ``--events``
WAHA ``message`` webhooks without media (``media.url`` null: no download, so the run measures the
delivery path only) by a poster that re-sends any webhook that did not get its ``200`` (as WAHA
retries); meanwhile it is killed with SIGKILL ``--kills`` times, at random moments 0.2-0.8 s after
each restart, and started again. At the end every event must have reached the bot sink; a
*repeat* is a delivery whose ``Idempotency-Key`` the sink had already seen. It prints the events,
the kills, the repeats (also per 1,000 events and per kill) and the load average beside them.

Run from the repository root::

    .venv/bin/python -m bench.delivery_repeats --events 1000 --kills 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import base_config, deep_merge, waha_payload
from tests.daemon import GatewayProcess, write_toml
from tests.emulators.sink import BotSink


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _post_all(url: str, events: int) -> None:
    """Post every webhook until it got a 200, a few at a time."""
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(8)

        async def post(i: int) -> None:
            body = json.dumps(waha_payload(None, message_id=f"rep-{i}"))
            async with sem:
                while True:
                    try:
                        async with http.post(f"{url}/webhooks/waha", data=body,
                                             timeout=aiohttp.ClientTimeout(total=5)) as r:
                            if r.status == 200:
                                return
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(post(i) for i in range(events)))


async def run(events: int, kills: int, seed: int) -> int:
    rng = random.Random(seed)
    sink = BotSink()
    runner = web.AppRunner(sink.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    sink.url = sink_url  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="gw-repeats-") as tmp:
        tmp_path = Path(tmp)
        port = _free_port()
        data = deep_merge(base_config(tmp_path, port, None, sink),
                          {"providers": {"waha": {"base_url": "http://127.0.0.1:9"}},
                           "log": {"level": "WARNING"}})
        daemon = GatewayProcess(write_toml(tmp_path / "gateway.toml", data), port, tmp_path / "daemon.log")
        await daemon.start()
        started = time.monotonic()
        poster = asyncio.create_task(_post_all(daemon.url, events))
        for k in range(kills):
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            daemon.kill()
            print(f"kill {k + 1}/{kills}: {len(sink.deliveries)} deliveries so far", file=sys.stderr)
            await daemon.start()
        await poster
        keys = Counter()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            keys = Counter(d.headers["Idempotency-Key"] for d in sink.deliveries)
            if len(keys) >= events:
                break
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        status = await daemon.terminate()
    await runner.cleanup()
    repeats = sum(n - 1 for n in keys.values())
    load = os.getloadavg()
    print(f"events {events}, delivered {len(keys)}, kills {kills}, deliveries {sum(keys.values())}, "
          f"repeats {repeats} ({1000 * repeats / events:.1f} per 1,000 events, {repeats / max(1, kills):.2f} "
          f"per kill), {elapsed:.1f}s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0 if len(keys) == events and status == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(run(args.events, args.kills, args.seed)))


if __name__ == "__main__":
    main()
