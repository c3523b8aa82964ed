"""B4 (issue 12): a burst of image webhooks against a WAHA that deletes each file 180 s after its
webhook; the target is 0 media lost.

- The WAHA emulator runs in its own process (:func:`bench.harness.waha_process`) with
  ``--delete-after``: each webhook names its own copy of ``tests/fixtures/media/photo.jpg``
  (55 KiB), whose URL carries the time its webhook was *first* sent
  (:meth:`tests.emulators.waha.WahaEmulator.message_file_url`); from that time plus
  ``--delete-after`` on, the file answers 404, as a real WAHA's would.
- The sender is a closed loop of ``--concurrency`` connections: each sends the next message as soon
  as its previous one was answered 200. A webhook answered otherwise (503 + ``Retry-After`` while the
  gateway holds media back, or a connection error) is sent again after ``Retry-After`` (0.5 s
  without one), as WAHA retries webhooks; its file's clock keeps running from the first send.
- The daemon (``python -m gateway serve``) stores to local disk (fsync) and forwards to a bot sink
  in the bench process that reads every forward: a forward whose ``gateway.notes`` is not empty
  carries the provider's link and a note instead of a stored copy: that media is **lost**.

Printed: acknowledgements/s, 503s, the longest a message waited for its 200, when all were stored
(the last forward), the peak of ``gateway_media_backlog_oldest_seconds`` and of
``gateway_media_store_estimate_seconds``, the oldest a message was (since its first send) when its
forward arrived, media lost (sink notes, ``gateway_media_ingested_total{outcome="failed"}``, 404s
the emulator answered), and the load average before and after. ``--compare DIR`` first runs the same
burst against the daemon of another source tree (e.g. ``git worktree add /tmp/main main``): the
baseline of the same run. Exit status 1 when media was lost (in the main run).

From the repository root::

    .venv/bin/python -m bench.burst                                  # 20,000 webhooks, files deleted after 180 s
    .venv/bin/python -m bench.burst --count 2000 --delete-after 20   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.harness import CountingSink, gateway_daemon, loadavg, metric, waha_process
from tests.conftest import MEDIA, waha_payload
from tests.daemon import REPO
from tests.emulators.waha import WahaEmulator


@dataclass
class Run:
    """What one burst measured; times are seconds since the first send."""

    count: int
    first_sent: dict[str, float] = field(default_factory=dict)  # message id -> epoch seconds
    acked: dict[str, float] = field(default_factory=dict)  # message id -> epoch seconds of its 200
    refused: int = 0  # answers other than 200 (503s) and connection errors
    forwarded: dict[str, float] = field(default_factory=dict)  # message id -> epoch seconds of its forward
    lost: list[str] = field(default_factory=list)  # forwarded with a note instead of a stored copy
    peak_backlog: float = 0.0
    peak_estimate: float = 0.0
    started: float = 0.0

    def inspect(self, body: bytes) -> None:
        """The sink's look at one forward."""
        data = json.loads(body)
        message_id = data["payload"]["id"]
        self.forwarded.setdefault(message_id, time.time())
        if data.get("gateway", {}).get("notes"):
            self.lost.append(message_id)


async def send(run: Run, url: str, template: str, files_url: str, concurrency: int) -> None:
    """The closed-loop sender (see the module docstring)."""
    ids = iter(range(run.count))

    async def connection(http: aiohttp.ClientSession) -> None:
        for n in ids:
            message_id = f"b4-{n}"
            sent = time.time()
            run.first_sent[message_id] = sent
            file_url = WahaEmulator.message_file_url(files_url, message_id, sent, "photo.jpg")
            body = template.replace("__MSGID__", message_id).replace("__URL__", file_url)
            while True:
                retry_after = 0.5
                try:
                    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        if r.status == 200:
                            run.acked[message_id] = time.time()
                            break
                        retry_after = float(r.headers.get("Retry-After", retry_after))
                except aiohttp.ClientError:
                    pass
                run.refused += 1
                await asyncio.sleep(retry_after)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        await asyncio.gather(*(connection(http) for _ in range(concurrency)))


async def watch(run: Run, gw_url: str, until: asyncio.Event) -> None:
    """Sample the backlog gauges every second; print progress every 10 s."""
    last_print = time.monotonic()
    while not until.is_set():
        try:
            backlog = await metric(gw_url, "gateway_media_backlog_oldest_seconds")
            estimate = await metric(gw_url, "gateway_media_store_estimate_seconds")
        except aiohttp.ClientError:
            backlog = estimate = 0.0
        run.peak_backlog = max(run.peak_backlog, backlog)
        run.peak_estimate = max(run.peak_estimate, estimate)
        if time.monotonic() - last_print >= 10:
            last_print = time.monotonic()
            print(f"  {time.time() - run.started:5.0f}s: acknowledged {len(run.acked)}, 503s {run.refused}, "
                  f"forwarded {len(run.forwarded)}, lost {len(run.lost)}, oldest waiting {backlog:.0f}s, "
                  f"estimate {estimate:.0f}s; load {loadavg()}", file=sys.stderr, flush=True)
        try:
            await asyncio.wait_for(until.wait(), 1.0)
        except TimeoutError:
            pass


async def burst(tmp: Path, name: str, code: Path, count: int, delete_after: float, concurrency: int) -> Run:
    """One burst of ``count`` webhooks against the daemon of source tree ``code``; prints its figures."""
    files = tmp / "waha-files"
    files.mkdir(exist_ok=True)
    shutil.copy(MEDIA / "photo.jpg", files / "photo.jpg")
    run = Run(count)
    sink = CountingSink(inspect=run.inspect)
    runner = await sink.start()
    load_before = loadavg()
    async with waha_process(files, "--delete-after", str(delete_after)) as waha_url:
        # the deadline the gateway plans with is the emulator's; a lost file fails after 3 quick attempts
        queue: dict[str, object] = {"max_attempts": 3, "backoff_base": 1.0, "backoff_max": 4.0,
                                    "poll_interval": 1.0, "media_deadline": delete_after}
        gw = gateway_daemon(tmp, name, {"waha": {"base_url": waha_url, "api_key": "waha-key"}},
                            [{"name": "bot", "url": sink.url}], code=code, overrides={"queue": queue})
        await gw.start()
        done = asyncio.Event()
        try:
            template = json.dumps(waha_payload("__URL__", message_id="__MSGID__"))
            run.started = time.time()
            watcher = asyncio.create_task(watch(run, gw.url, done))
            await send(run, f"{gw.url}/webhooks/waha", template, f"{waha_url}", concurrency)
            last_ack = max(run.acked.values())
            give_up = time.monotonic() + delete_after + 300
            while len(run.forwarded) < count and time.monotonic() < give_up:
                await asyncio.sleep(0.2)
            done.set()
            await watcher
            failed = await metric(gw.url, "gateway_media_ingested_total", 'outcome="failed"')
            fetch_404 = await metric(gw.url, "gateway_media_fetch_failures_total", 'reason="http_404"')
            async with aiohttp.ClientSession() as http, http.get(f"{waha_url}/_emulator/stats") as r:
                stats = await r.json()
        finally:
            await gw.terminate()
            await runner.cleanup()
    t0 = run.started
    waited = max(run.acked[m] - run.first_sent[m] for m in run.acked)
    oldest = max((run.forwarded[m] - run.first_sent[m] for m in run.forwarded), default=float("nan"))
    missing = count - len(run.forwarded)
    print(f"{name}: {count} webhooks, {concurrency} connections, files deleted {delete_after:g} s after "
          f"their first send; load before {load_before}", flush=True)
    print(f"  acknowledged {len(run.acked)} in {last_ack - t0:.1f} s: {len(run.acked) / (last_ack - t0):.0f}/s; "
          f"{run.refused} answers were not 200 (sent again); the longest a webhook waited for its 200: "
          f"{waited:.1f} s", flush=True)
    last_forward = max(run.forwarded.values(), default=t0) - t0
    print(f"  all stored and forwarded after {last_forward:.1f} s ({len(run.forwarded)} forwarded, {missing} "
          f"missing); peak backlog (oldest waiting media) {run.peak_backlog:.0f} s, peak store estimate "
          f"{run.peak_estimate:.0f} s; the oldest a message was at its forward: {oldest:.1f} s", flush=True)
    print(f"  media lost: {len(run.lost) + missing} (forwarded with a note {len(run.lost)}, never forwarded "
          f"{missing}; the gateway's failed ingests {failed:.0f}, its 404s {fetch_404:.0f}; the emulator answered "
          f"{stats['deleted_hits']} deleted-file 404s, served {stats['message_files_served']}); "
          f"load after {loadavg()}", flush=True)
    return run


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="webhooks (one image each)")
    parser.add_argument("--delete-after", type=float, default=180.0,
                        help="seconds after its webhook's first send that a file answers 404 (WAHA: 180)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections of the closed-loop sender")
    parser.add_argument("--compare", type=Path, default=None,
                        help="first run the same burst against the daemon of this source tree (a baseline)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (daemon.log, catalog, media)")
    args = parser.parse_args()
    nproc = len(__import__("os").sched_getaffinity(0))
    print(f"B4 burst; {nproc} cores; load average {loadavg()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-burst-"))
    try:
        if args.compare is not None:
            base = await burst(tmp, "baseline", args.compare.resolve(), args.count, args.delete_after,
                               args.concurrency)
        run = await burst(tmp, "gateway", REPO, args.count, args.delete_after, args.concurrency)
        lost = len(run.lost) + args.count - len(run.forwarded)
        if args.compare is not None:
            base_lost = len(base.lost) + args.count - len(base.forwarded)
            base_rate = len(base.acked) / (max(base.acked.values()) - base.started)
            rate = len(run.acked) / (max(run.acked.values()) - run.started)
            print(f"B4 lost {lost} (target 0) against {base_lost} for {args.compare}; acks/s {rate:.0f} vs "
                  f"{base_rate:.0f} (x{rate / base_rate:.2f}); load {loadavg()}", flush=True)
        else:
            print(f"B4 lost {lost} of {args.count} (target 0); load {loadavg()}", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
