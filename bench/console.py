"""How long each console page takes to render with 10,000 stored objects.

A gateway (``gateway.app.create_app``, local storage and the SQLite catalog in a temp directory,
served on 127.0.0.1 by an ``aiohttp`` runner in this process) gets ``--objects`` media rows inserted
straight through the catalog (``insert_media``: rows only, spread over categories, providers, chats
and the last 30 days) and ``--jobs`` deliver jobs that die at once (no such event), so the queue page
has a dead letter. Then each page is fetched ``--repeat`` times, signed in as an admin key, one
request at a time, and the median and 95th percentile are printed beside two baselines measured in
the same run: ``GET /healthz`` (the HTTP stack alone) and ``GET /api/v1/files?limit=48`` (the JSON
of one gallery page). Also timed: one real photo's thumbnail, made on first request, then read back.

Run from the repository root::

    .venv/bin/python -m bench.console                   # 10,000 objects, 1,000 jobs, 20 requests a page
    .venv/bin/python -m bench.console --objects 100000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.app import create_app
from gateway.catalog import exact_time
from gateway.config import Settings
from gateway.keys import CATALOG
from tests.conftest import MEDIA, base_config, deep_merge

ADMIN = "bench-admin"
CATEGORIES = ["image", "video", "audio", "document", "sticker", "voice"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the links the gateway signs name its port)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def seed(app: web.Application, objects: int, jobs: int) -> None:
    catalog = app[CATALOG]
    rng = random.Random(14)
    now = time.time()
    for n in range(objects):
        category = CATEGORIES[n % len(CATEGORIES)]
        await catalog.insert_media({
            "id": f"m_bench{n:022d}", "sha256": f"{n:064x}", "size": rng.randint(1_000, 5_000_000),
            "mimetype": "image/jpeg" if category in ("image", "sticker") else "application/octet-stream",
            "declared_mimetype": None, "category": category, "filename": f"file-{n}.bin", "backend": "local",
            "bucket": None, "key": f"bench/{n}", "provider": rng.choice(["waha", "meta", "api"]),
            "account": f"acct{n % 5}", "chat": f"chat{n % 200}@c.us", "message_id": f"msg{n}",
            "direction": "inbound", "source_key": f"bench:{n}", "source_url": None, "event_id": None,
            "created_at": exact_time(now - rng.uniform(0, 30 * 86400)), "expires_at": None,
            "tenant": None, "is_public": 0, "extra": None})
    for n in range(jobs):
        await catalog.enqueue("deliver", f"deliver:bench{n}", {"event_id": f"ev_missing{n}", "target": "bot"})


async def timed(http: aiohttp.ClientSession, url: str, repeat: int, headers: dict[str, str]) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        async with http.get(url, headers=headers, allow_redirects=False) as r:
            await r.read()
            assert r.status == 200, (url, r.status)
        times.append(time.perf_counter() - started)
    return times


def row(name: str, times: list[float], base: float) -> str:
    median = statistics.median(times)
    p95 = sorted(times)[max(0, int(len(times) * 0.95) - 1)]
    return f"{name:<34} {median * 1000:9.1f} {p95 * 1000:9.1f} {median / base:9.1f}"


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("gateway").setLevel(logging.ERROR)  # the dying bench jobs log one line each
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        data = deep_merge(base_config(Path(tmp), port, None, None),
                          {"api": {"keys": [{"name": "admin", "key": ADMIN, "scopes": ["admin"]}]},
                           "retention": {"enabled": False}})
        app = create_app(Settings(config_dir=Path(tmp), **data))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            await seed(app, args.objects, args.jobs)
            print(f"seeded {args.objects} media rows and {args.jobs} jobs in {time.perf_counter() - started:.1f} s")
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    dead = await app[CATALOG].list_jobs(state="dead")
                    if len(dead) >= args.jobs:
                        break
                    await asyncio.sleep(0.1)
                async with http.post(f"{url}/console/login", data={"key": ADMIN}, allow_redirects=False) as r:
                    assert r.status == 303
                    cookie = r.cookies["gateway_console"].value
                page = {"Cookie": f"gateway_console={cookie}"}
                api = {"Authorization": f"Bearer {ADMIN}"}
                form = aiohttp.FormData()
                form.add_field("file", (MEDIA / "photo.jpg").read_bytes(), filename="photo.jpg")
                async with http.post(f"{url}/api/v1/files", data=form, headers=api) as r:
                    photo = await r.json()
                async with http.get(f"{url}/api/v1/files?limit=48", headers=api) as r:
                    cursor = (await r.json())["next_cursor"]
                health = await timed(http, f"{url}/healthz", args.repeat, {})
                base = statistics.median(health)
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                print(f"load average {load}; {args.repeat} requests each, one at a time; times in ms")
                print(f"{'page':<34} {'median':>9} {'p95':>9} {'x healthz':>9}")
                print(row("GET /healthz (baseline)", health, base))
                print(row("GET /api/v1/files?limit=48", await timed(http, f"{url}/api/v1/files?limit=48",
                                                                     args.repeat, api), base))
                for name, path in (("overview /console", "/console"),
                                   ("gallery /console/gallery", "/console/gallery"),
                                   ("gallery, category=video", "/console/gallery?category=video"),
                                   ("gallery, filename=file-99", "/console/gallery?filename=file-99"),
                                   ("gallery, next page (cursor)", f"/console/gallery?cursor={cursor}"),
                                   ("detail /console/files/{id}", f"/console/files/{photo['id']}"),
                                   ("queue /console/queue", "/console/queue")):
                    print(row(name, await timed(http, url + path, args.repeat, page), base))
                first = await timed(http, photo["links"]["thumbnail"], 1, {})
                cached = await timed(http, photo["links"]["thumbnail"], args.repeat, {})
                print(row("thumbnail, first request (made)", first, base))
                print(row("thumbnail, stored", cached, base))
                print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=20)
    asyncio.run(main(parser.parse_args()))
