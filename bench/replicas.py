"""Scale-out run: the same webhook load through 1 and through 3 gateway replicas on one PostgreSQL
catalog and one SeaweedFS bucket (README "Running several replicas"), and the lease recovery time
after a replica is SIGKILLed.

Everything is real and on 127.0.0.1: PostgreSQL from Debian's package (``tests.postgres``, durability
off as in the tests), SeaweedFS (``tests.seaweed``), replicas as ``python -m gateway serve``
subprocesses (``tests.replicas.ReplicaSet``), the WAHA emulator and the bot sink in this process.
For each replica count: a fresh database and bucket, ``--messages`` WAHA webhooks each with one
small attachment (``sticker.webp``, 6.5 KB), posted ``--concurrency`` at a time round-robin across
the replicas. It prints **acks/s** (webhooks answered 200 per second of posting) and **forwards/s**
(messages forwarded to the bot per second from the first post to the last forward), the ratio
3-replica/1-replica (the 1-replica run is the baseline, measured in the same run), and the load
average beside them. Then, with 3 replicas and a slow WAHA, one replica is SIGKILLed while it runs
jobs: the **recovery time** is from the kill until the others have taken over all of its running
jobs (the lease, ``--lease`` seconds, plus a poll), and every message must still be forwarded.
On 2 cores the replicas share the same CPUs: the point is correctness and the cost per replica,
not a linear speed-up.

Run from the repository root (as root or a user who may run PostgreSQL's initdb)::

    .venv/bin/python -m bench.replicas --messages 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import MEDIA, waha_payload
from tests.emulators.sink import BotSink
from tests.emulators.waha import WahaEmulator
from tests.postgres import PostgresServer
from tests.replicas import ReplicaSet
from tests.seaweed import SeaweedS3, free_ports

FILE = "sticker.webp"


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def _wait_forwarded(sink: BotSink, ids: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ids <= {d.json["payload"]["id"] for d in sink.deliveries}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids - {d.json['payload']['id'] for d in sink.deliveries})} not forwarded")
        await asyncio.sleep(0.05)


async def _post(http: aiohttp.ClientSession, replicas: ReplicaSet, waha: WahaEmulator, ids: list[str],
                concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, message_id: str) -> None:
        url = waha.add_file(MEDIA / FILE, name=f"{message_id}.webp")
        body = json.dumps(waha_payload(url, message_id=message_id, filename=FILE))
        async with sem, http.post(f"{replicas.procs[i % len(replicas.procs)].url}/webhooks/waha", data=body) as r:
            if r.status != 200:
                raise RuntimeError(f"webhook answered {r.status}: {await r.text()}")

    await asyncio.gather(*(one(i, m) for i, m in enumerate(ids)))


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="gw-replicas-"))
    pg, s3 = PostgresServer().start(), SeaweedS3(tmp / "seaweed")
    waha = WahaEmulator(api_key="waha-key", lifetime=3600, workdir=tmp / "waha")
    sink = BotSink()
    waha_runner, waha.base_url = await _serve(waha.app)
    sink_runner, sink_base = await _serve(sink.app)
    sink.url = f"{sink_base}/hook"  # type: ignore[attr-defined]
    results: dict[int, tuple[float, float]] = {}
    status = 0
    try:
        s3.start()
        settings: dict[str, Any] = {"queue": {"workers": args.workers, "lease": args.lease},
                                    "log": {"level": "WARNING"}, "retention": {"enabled": False}}
        async with aiohttp.ClientSession() as http:
            for n in (1, 3):
                storage = {"backend": "s3", "s3": s3.storage_section(f"bench-{n}-{uuid.uuid4().hex[:8]}")}
                replicas = ReplicaSet(tmp / f"run-{n}", free_ports(n), pg.create_database("bench"),
                                      storage, waha, sink, **settings)
                await replicas.start()
                try:
                    ids = [f"r{n}-{i}" for i in range(args.messages)]
                    started = time.monotonic()
                    await _post(http, replicas, waha, ids, args.concurrency)
                    acked = time.monotonic() - started
                    await _wait_forwarded(sink, set(ids), timeout=600)
                    forwarded = time.monotonic() - started
                finally:
                    await replicas.stop()
                results[n] = (len(ids) / acked, len(ids) / forwarded)
                load = os.getloadavg()
                print(f"{n} replica(s): {args.messages} webhooks, {results[n][0]:.0f} acks/s, "
                      f"{results[n][1]:.0f} forwards/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
                      flush=True)
            print(f"3 vs 1 replica: acks/s x{results[3][0] / results[1][0]:.2f}, "
                  f"forwards/s x{results[3][1] / results[1][1]:.2f}")

            # recovery: 3 replicas, slow downloads, one replica killed while it runs jobs
            storage = {"backend": "s3", "s3": s3.storage_section(f"bench-kill-{uuid.uuid4().hex[:8]}")}
            replicas = ReplicaSet(tmp / "run-kill", free_ports(3), pg.create_database("bench"),
                                  storage, waha, sink, **settings)
            await replicas.start()
            try:
                waha.delay = 0.5
                ids = [f"kill-{i}" for i in range(60)]
                await _post(http, replicas, waha, ids, args.concurrency)
                victim = replicas.procs[0]
                while not (doomed := replicas.running_jobs_of(victim)):
                    await asyncio.sleep(0.02)
                victim.kill()
                killed = time.monotonic()
                while replicas.rows("SELECT 1 FROM jobs WHERE id = ANY(%s) AND state = 'running' AND owner LIKE %s",
                                    doomed, f"%:{victim.pid}:%"):
                    await asyncio.sleep(0.02)
                recovery = time.monotonic() - killed
                waha.delay = 0.0
                await _wait_forwarded(sink, set(ids), timeout=120)
                stored = replicas.rows("SELECT COUNT(*), COUNT(DISTINCT source_key) FROM media")[0]
                load = os.getloadavg()
                print(f"kill: lease {args.lease:.1f} s, {len(doomed)} running job(s) of the killed replica taken "
                      f"over after {recovery:.2f} s; all {len(ids)} messages forwarded, {stored[0]} media rows "
                      f"({stored[1]} distinct attachments); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
                if stored[0] != len(ids) or stored[1] != len(ids):
                    status = 1
            finally:
                await replicas.stop()
    finally:
        await waha_runner.cleanup()
        await sink_runner.cleanup()
        s3.cleanup()
        pg.stop()
        if not args.keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600, help="webhooks per replica count (default 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="webhooks in flight (default 16)")
    parser.add_argument("--workers", type=int, default=4, help="[queue] workers of each replica (default 4)")
    parser.add_argument("--lease", type=float, default=5.0, help="[queue] lease, seconds (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs)")
    raise SystemExit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
