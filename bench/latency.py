"""End-to-end latency of an image message (issue 12, B7): webhook sent -> bot received, for the
gateway daemon and for :mod:`bench.min_relay` (a minimal durable relay: commit, ack, fetch, hash,
fsync, forward; no job table), under the same open-loop load in the same run.

- The WAHA emulator runs in its own process (:class:`bench.harness.WahaProcess`) and serves a
  100 KiB JPEG (``tests/fixtures/media/photo.jpg`` padded with a JPEG comment segment) under a
  distinct URL per message, stamping when each download request arrives.
- A bot sink in this process stamps when each forward arrives (keyed by ``payload.id``).
- An open-loop sender posts WAHA ``message`` webhooks at ``--rate`` per second (default 50) for
  ``--seconds`` (default 30) to each, stamping each send: to the relay, then to the gateway daemon
  (local storage with fsync, SQLite catalog, log level WARNING; ``--code DIR`` runs another
  source tree's daemon, ``--set`` changes its settings), alternating in ``--slices`` (default 3)
  so that both meet the same moments of a shared machine; both run throughout. Every message must
  arrive (exit status 1 otherwise).
- It prints p50, p90, p99 and max of (bot received - webhook sent) for both, the gateway/relay
  ratios (target: p99 <= 1.25x), the CPU seconds each used, the gateway's catalog commits per
  message, the p99 of each 5 s of sending, the load average before and after each slice, and the
  fsync latency of the temp directory's disk before and after.
- Where the gateway's time goes: from the catalog (``events.received_at``, ``media.created_at``,
  the jobs' times) and a trigger this bench adds to the daemon's catalog once it runs (one row in
  ``bench_job_marks`` per job state change, in the same transaction: the time the worker asked,
  and the time the catalog thread ran the statement), plus the emulator's and the sink's stamps,
  the median and p99 of each phase, and their mean over the slowest 1% of messages; and how full
  the fetch lane was while those waited for a fetch worker.
- ``--wal-pages``: the WAL frames the gateway's catalog wrote during its slices, per message and
  by table and index (:mod:`bench.wal_pages`).

From the repository root::

    .venv/bin/python -m bench.latency                  # 50 msg/s, 30 s each
    .venv/bin/python -m bench.latency --seconds 10 --code /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    CountingSink,
    Sent,
    WahaProcess,
    gateway_daemon,
    loadavg,
    metric,
    open_loop,
    percentile,
)
from bench.stream_1gib import cpu_seconds
from bench.wal_pages import WalRecorder, WalWrites
from tests.conftest import MEDIA, deep_merge, waha_payload
from tests.daemon import REPO

IMAGE_BYTES = 100 * 1024
API_KEY = "waha-key"
DRAIN_TIMEOUT = 60.0  # seconds to wait after the last webhook for the rest to arrive
TARGET_P99_RATIO = 1.25

# Records each job state change with the worker's time (updated_at) and the statement's.
MARKS_SQL = """
CREATE TABLE IF NOT EXISTS bench_job_marks (job_id INTEGER, kind TEXT, state TEXT, asked REAL, at REAL);
CREATE TRIGGER IF NOT EXISTS bench_job_marks AFTER UPDATE OF state ON jobs BEGIN
  INSERT INTO bench_job_marks VALUES (NEW.id, NEW.kind, NEW.state, NEW.updated_at,
                                      (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TRIGGER IF NOT EXISTS bench_job_marks_handed AFTER INSERT ON jobs WHEN NEW.state = 'running' BEGIN
  INSERT INTO bench_job_marks VALUES (NEW.id, NEW.kind, NEW.state, NEW.updated_at,
                                      (julianday('now') - 2440587.5) * 86400.0);
END;
"""
# (the second trigger: a job created claimed, as an ingest's deliveries are, handed to this daemon's
# deliver workers in the completion's transaction)


def setting(text: str) -> dict[str, Any]:
    """``"storage.local.fsync=false"`` (a dotted settings path, a TOML value) as nested dicts.
    Raises ``argparse.ArgumentTypeError`` for anything else."""
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not TOML ({exc})") from None
    out: dict[str, Any] = {}
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = parsed
    return out


def make_image(dest: Path, size: int = IMAGE_BYTES) -> Path:
    """``photo.jpg`` with a comment segment (``FF FE``) after its SOI padding it to ``size`` bytes:
    a valid JPEG, ``image/jpeg`` to libmagic."""
    photo = (MEDIA / "photo.jpg").read_bytes()
    pad = size - len(photo) - 4
    if not 0 <= pad <= 65533:
        raise ValueError(f"cannot pad {len(photo)} bytes to {size} with one comment segment")
    dest.write_bytes(photo[:2] + b"\xff\xfe" + struct.pack(">H", pad + 2) + b"\x00" * pad + photo[2:])
    return dest


def fsync_latency(directory: Path, count: int = 50) -> str:
    """p50, p90 and max (ms) of ``count`` fsyncs of a 4 KiB append in ``directory``: the price of
    each durable step on this disk at this moment (the gateway takes several in a row per message,
    the relay three)."""
    path = directory / "fsync-probe"
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"\0" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return (f"fsync p50 {percentile(times, 0.5):.1f} ms, p90 {percentile(times, 0.9):.1f}, "
            f"max {max(times):.1f}")


def fetch_workers(code: Path, overrides: dict[str, Any]) -> int:
    """The daemon's ``[queue] fetch_workers``: from ``overrides``, else the default of the source
    tree ``code`` (asked of its ``gateway.config``)."""
    if "fetch_workers" in overrides.get("queue", {}):
        return int(overrides["queue"]["fetch_workers"])
    out = subprocess.run([sys.executable, "-c", "from gateway.config import QueueSettings as Q; "
                          "print(Q().fetch_workers)"], cwd=code, capture_output=True, text=True, check=True)
    return int(out.stdout)


def message_id(body: bytes) -> str:
    """The WAHA message id (``payload.id``) of a forwarded message."""
    return str(json.loads(body)["payload"]["id"])


@dataclass
class Trip:
    """One message's epoch times: sent, answered (HTTP status), download request at WAHA, bot
    received (NaN when missing); ``marks``: the gateway's catalog times by phase name."""

    sent: float
    answered: float
    status: int
    fetch: float
    bot: float
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Seconds from webhook sent to bot received."""
        return self.bot - self.sent


async def drive(name: str, webhook_url: str, waha: WahaProcess, offset: int, sink: CountingSink,
                rate: float, seconds: float) -> dict[str, Trip]:
    """The open-loop load on ``webhook_url`` (message ids ``<name>-<i>``, media alias ``offset + i``);
    waits up to :data:`DRAIN_TIMEOUT` after the last for every message to reach the sink.
    Returns ``{message id: Trip}``."""
    def body(i: int) -> str:
        return json.dumps(waha_payload(waha.url(offset + i), message_id=f"{name}-{i}"))

    sent: list[Sent] = await open_loop(webhook_url, body, rate, seconds)
    ids = [f"{name}-{s.index}" for s in sent]
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while any(i not in sink.arrivals for i in ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    fetches = await waha.arrivals()
    nan = float("nan")
    return {i: Trip(s.sent, s.answered, s.status, fetches.get(offset + s.index, nan), sink.arrivals.get(i, nan))
            for i, s in zip(ids, sent)}


def gateway_marks(db: Path, trips: dict[str, Trip]) -> None:
    """Fill each trip's ``marks`` from the daemon's catalog: ``received`` (the webhook's
    ``received_at``), ``ingest_asked``/``ingest_claimed`` (the worker asked for a job / the claim
    ran), ``stored`` (the media row's ``created_at``, after fsync and rename), ``ingest_done``
    (the completion asked), ``ingest_done_sql``, ``deliver_asked``/``deliver_claimed``,
    ``deliver_done``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        events = {ev: (mid, received) for ev, mid, received in
                  conn.execute("SELECT id, message_id, received_at FROM events")}
        for ev, (mid, received) in events.items():
            if mid in trips:
                trips[mid].marks["received"] = received
        stored = dict(conn.execute("SELECT event_id, created_at FROM media"))
        jobs: dict[int, tuple[str, str]] = {}
        for job_id, kind, payload, updated, state in conn.execute(
                "SELECT id, kind, payload, updated_at, state FROM jobs"):
            ev = json.loads(payload)["event_id"]
            jobs[job_id] = (kind, ev)
            if ev in events and events[ev][0] in trips and state == "done":
                trips[events[ev][0]].marks[f"{kind}_done"] = updated
        for ev, at in stored.items():
            if ev in events and events[ev][0] in trips:
                trips[events[ev][0]].marks["stored"] = at
        for job_id, state, asked, at in conn.execute(
                "SELECT job_id, state, asked, at FROM bench_job_marks ORDER BY rowid"):
            kind, ev = jobs.get(job_id, ("?", ""))
            marks = trips[events[ev][0]].marks if ev in events and events[ev][0] in trips else None
            if marks is None:
                continue
            if state == "running" and f"{kind}_claimed" not in marks:
                marks[f"{kind}_asked"], marks[f"{kind}_claimed"] = asked, at
            elif state == "done":
                marks[f"{kind}_done_sql"] = at
    finally:
        conn.close()


# (label, from, to): the gateway's phases, in pipeline order; "sent", "answered", "fetch" and "bot"
# are the bench's stamps, the others catalog marks.
GATEWAY_PHASES = [
    ("webhook sent -> received by the daemon", "sent", "received"),
    ("received -> acknowledged (group commit, answer)", "received", "answered"),
    ("received -> ingest claimed", "received", "ingest_claimed"),
    ("  of which: webhook commit, waiting for a fetch worker", "received", "ingest_asked"),
    ("  of which: claim waiting for the catalog thread", "ingest_asked", "ingest_claimed"),
    ("ingest claimed -> download asked at WAHA", "ingest_claimed", "fetch"),
    ("download asked -> media stored (fetch, sniff, hash, write, fsync, rename)", "fetch", "stored"),
    ("media stored -> ingest done (rewrite; the row goes in with the completion)", "stored", "ingest_done"),
    ("ingest done -> deliver claimed", "ingest_done", "deliver_claimed"),
    ("  of which: media row + done + followup commit ran", "ingest_done", "ingest_done_sql"),
    ("  of which: deliver claim waiting for the catalog thread", "deliver_asked", "deliver_claimed"),
    ("deliver claimed -> bot received (claim commit, event read, POST)", "deliver_claimed", "bot"),
    ("webhook sent -> bot received", "sent", "bot"),
]
EXTERNAL_PHASES = [
    ("webhook sent -> answered 200", "sent", "answered"),
    ("webhook sent -> download asked at WAHA", "sent", "fetch"),
    ("download asked -> bot received", "fetch", "bot"),
    ("webhook sent -> bot received", "sent", "bot"),
]


def stamp(trip: Trip, name: str) -> float:
    """The time ``name`` of ``trip`` (a bench stamp or a catalog mark); NaN when missing."""
    if name in trip.marks:
        return trip.marks[name]
    return float(getattr(trip, name, float("nan")))


def phase_table(trips: Sequence[Trip], phases: Sequence[tuple[str, str, str]]) -> list[str]:
    """One line per phase: median, p99 and max over the trips that have both stamps, and the mean
    over the slowest 1% of trips (by total latency), in milliseconds."""
    complete = [t for t in trips if t.total == t.total]
    slow = sorted(complete, key=lambda t: t.total)[-max(1, len(complete) // 100):]
    width = max(len(label) for label, _, _ in phases)
    lines = [f"  {'phase (ms)':<{width}}  {'p50':>7} {'p99':>7} {'max':>7}  {'slowest 1%':>10}"]
    for label, start, end in phases:
        def spans(ts: Sequence[Trip]) -> list[float]:
            values = [(stamp(t, end) - stamp(t, start)) * 1000 for t in ts]
            return [v for v in values if v == v]
        every, worst = spans(complete), spans(slow)
        mean_slow = statistics.fmean(worst) if worst else float("nan")
        lines.append(f"  {label:<{width}}  {percentile(every, 0.5):7.1f} {percentile(every, 0.99):7.1f} "
                     f"{max(every, default=float('nan')):7.1f}  {mean_slow:10.1f}")
    return lines


def busy_fetch_lane(trips: Sequence[Trip], workers: int) -> str:
    """Whether the slowest 1% of trips waited for their ingest claim because the fetch lane was
    full: for each, the ingest jobs running (claimed, completion not yet run), averaged over the
    time between its ``received`` and the claim its worker asked for (sampled at 50 moments), and
    the fewest at any of those moments. An average near ``workers`` means a full lane (a queue);
    well below means workers were between jobs (waiting for the catalog) or idle."""
    def mark(t: Trip, name: str) -> float:
        return t.marks.get(name, float("nan"))

    running = [(mark(t, "ingest_claimed"), mark(t, "ingest_done_sql")) for t in trips]
    complete = sorted((t for t in trips if t.total == t.total), key=lambda t: t.total)
    means: list[float] = []
    fewest: list[int] = []
    for t in complete[-max(1, len(complete) // 100):]:
        start, end = mark(t, "received"), mark(t, "ingest_asked")
        if not start <= end:
            continue
        counts = [sum(1 for c, e in running if c <= m < e)
                  for m in (start + (end - start) * k / 49 for k in range(50))]
        means.append(statistics.fmean(counts))
        fewest.append(min(counts))
    if not means:
        return "no trip with its ingest claim recorded"
    return (f"while the slowest 1% waited for a fetch worker, {statistics.fmean(means):.1f} of {workers} fetch "
            f"workers were running an ingest job on average (fewest at a moment: {min(fewest)})")


def timeline(trips: Sequence[Trip], window: float = 5.0) -> str:
    """The p99 of (bot received - webhook sent) of the trips sent in each ``window`` seconds, in
    ms (e.g. ``0s: 21, 5s: 480, ...``): whether a tail is one stall or spread over the run."""
    complete = [t for t in trips if t.total == t.total]
    if not complete:
        return ""
    t0 = min(t.sent for t in complete)
    buckets: dict[int, list[float]] = {}
    for t in complete:
        buckets.setdefault(int((t.sent - t0) // window), []).append(t.total * 1000)
    return ", ".join(f"{b * window:g}s: {percentile(v, 0.99):.0f}" for b, v in sorted(buckets.items()))


def summary(name: str, trips: dict[str, Trip]) -> dict[str, float]:
    """Print and return the latency percentiles (ms) of ``trips`` with their counts."""
    totals = [t.total * 1000 for t in trips.values() if t.total == t.total]
    non200 = sum(1 for t in trips.values() if t.status != 200)
    stats = {"p50": percentile(totals, 0.5), "p90": percentile(totals, 0.9), "p99": percentile(totals, 0.99),
             "max": max(totals, default=float("nan")), "received": len(totals), "sent": len(trips)}
    print(f"{name}: webhook sent -> bot received p50 {stats['p50']:.1f} ms, p90 {stats['p90']:.1f}, "
          f"p99 {stats['p99']:.1f}, max {stats['max']:.1f}; received {len(totals)} of {len(trips)} "
          f"(non-200 answers {non200}); load {loadavg()}", flush=True)
    return stats


class Relay:
    """:mod:`bench.min_relay` as a subprocess, forwarding to ``sink``."""

    name = "relay"

    def __init__(self, tmp: Path, sink: CountingSink, record_stored: bool = False):
        self.args = [sys.executable, "-m", "bench.min_relay", "--db", str(tmp / "relay.db"),
                     "--storage", str(tmp / "relay-media"), "--bot-url", sink.url, "--api-key", API_KEY,
                     *(["--record-stored"] if record_stored else [])]
        self.proc: subprocess.Popen[str] | None = None
        self.webhook_url = ""

    async def start(self) -> None:
        """Start it; :attr:`webhook_url` once it listens."""
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.webhook_url = f"http://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}/webhooks/waha"

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    async def counters(self) -> tuple[float, float]:
        """CPU seconds used so far, and catalog commits (one per webhook: not counted, 0)."""
        return cpu_seconds(self.proc.pid if self.proc else None), 0.0


class Gateway:
    """The gateway daemon of source tree ``code`` with ``overrides``, forwarding to ``sink``, with
    :data:`MARKS_SQL` added to its catalog once it runs."""

    name = "gateway"

    def __init__(self, tmp: Path, code: Path, overrides: dict[str, Any], waha: WahaProcess, sink: CountingSink):
        self.daemon = gateway_daemon(tmp, "gateway", {"waha": {"base_url": waha.base_url, "api_key": API_KEY}},
                                     [{"name": "bot", "url": sink.url}], code=code, overrides=overrides)
        self.db = self.daemon.config.parent / "var" / "gateway.db"
        self.webhook_url = f"{self.daemon.url}/webhooks/waha"

    async def start(self) -> None:
        """Start the daemon (``/healthz`` answers), then add the trigger."""
        await self.daemon.start()
        conn = sqlite3.connect(self.db, timeout=10, isolation_level=None)
        try:
            conn.executescript(MARKS_SQL)
        finally:
            conn.close()

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self.daemon.proc is not None:
            await self.daemon.terminate()

    async def counters(self) -> tuple[float, float]:
        """CPU seconds used so far, and catalog commits (``gateway_catalog_commits_total``)."""
        return cpu_seconds(self.daemon.pid), await metric(self.daemon.url, "gateway_catalog_commits_total")

    async def marks(self, trips: dict[str, Trip]) -> None:
        """:func:`gateway_marks` once every delivered message's ``deliver`` job is done (its
        commit comes a moment after the bot got the POST), or after 10 s."""
        deadline = time.monotonic() + 10
        while True:
            await asyncio.to_thread(gateway_marks, self.db, trips)
            if all("deliver_done" in t.marks for t in trips.values() if t.bot == t.bot) \
                    or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.2)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="webhooks per second (default 50)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load on each (default 30)")
    parser.add_argument("--slices", type=int, default=3,
                        help="the load alternates between relay and gateway in this many slices each, so "
                             "that both meet the same moments of a shared machine (default 3)")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a daemon setting (TOML value), e.g. storage.local.fsync=false; repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (daemon.log, catalog)")
    parser.add_argument("--relay-records", action="store_true",
                        help="the relay also commits what it stored before each forward (min_relay "
                             "--record-stored): a reference, not B7's baseline")
    parser.add_argument("--wal-pages", action="store_true",
                        help="hold a read snapshot on the gateway's catalog during its slices and print the WAL "
                             "frames its commits wrote, by table and index (bench.wal_pages; the WAL grows "
                             "meanwhile, so this run's latencies are not the normal ones)")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="run the daemon of this source tree (e.g. an earlier commit from git archive)")
    args = parser.parse_args()
    code = args.code.resolve()
    overrides: dict[str, Any] = {}
    for one in args.set:
        overrides = deep_merge(overrides, one)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-latency-"))
    settings = f" with {json.dumps(overrides)}" if overrides else ""
    print(f"daemon from {code}{settings}; {len(os.sched_getaffinity(0))} cores; {IMAGE_BYTES // 1024} KiB JPEG "
          f"at {args.rate:g} msg/s for {args.seconds:g} s each, alternating in {args.slices} slices; "
          f"load average before {loadavg()}; {await asyncio.to_thread(fsync_latency, tmp)}", flush=True)
    sink = CountingSink(key=message_id)
    runner = await sink.start()
    trips: dict[str, dict[str, Trip]] = {"relay": {}, "gateway": {}}
    used = {"relay": [0.0, 0.0], "gateway": [0.0, 0.0]}  # CPU seconds, catalog commits
    slice_seconds = args.seconds / args.slices
    per_slice = int(args.rate * slice_seconds)
    wal: WalWrites | None = None
    try:
        with WahaProcess(make_image(tmp / "image.jpg"), 2 * per_slice * args.slices, API_KEY) as waha:
            systems: list[Relay | Gateway] = [Relay(tmp, sink, args.relay_records), Gateway(tmp, code, overrides, waha, sink)]
            try:
                for system in systems:
                    await system.start()
                await asyncio.sleep(0.3)
                recorder = WalRecorder(systems[1].db) if isinstance(systems[1], Gateway) and args.wal_pages else None
                if recorder is not None:
                    recorder.start()
                offset = 0
                for k in range(args.slices):
                    for system in systems:
                        before = await system.counters()
                        trips[system.name].update(await drive(f"{system.name}-{k}", system.webhook_url, waha,
                                                              offset, sink, args.rate, slice_seconds))
                        after = await system.counters()
                        used[system.name] = [u + a - b for u, a, b in zip(used[system.name], after, before)]
                        offset += per_slice
                        print(f"  {system.name} slice {k + 1}/{args.slices} done; load {loadavg()}", flush=True)
                assert isinstance(systems[1], Gateway)
                wal = await asyncio.to_thread(recorder.stop) if recorder is not None else None
                await systems[1].marks(trips["gateway"])
                fsync_after = await asyncio.to_thread(fsync_latency, tmp)
            finally:
                for system in systems:
                    await system.stop()
    finally:
        await runner.cleanup()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    relay, gateway = trips["relay"], trips["gateway"]
    print(f"after the load: {fsync_after}")
    r = summary("relay recording what it stored" if args.relay_records else "minimal relay", relay)
    g = summary("gateway", gateway)
    sent = per_slice * args.slices
    print(f"\nCPU seconds per 1,000 messages: relay {used['relay'][0] / sent * 1000:.1f}, "
          f"gateway {used['gateway'][0] / sent * 1000:.1f}; gateway catalog commits per message "
          f"{used['gateway'][1] / sent:.2f} (the relay: {2 if args.relay_records else 1})")
    print("\nboth, seen from outside (bench, emulator and sink stamps):")
    for name in ("relay", "gateway"):
        print(f" {name}")
        print("\n".join(phase_table(list(trips[name].values()), EXTERNAL_PHASES)))
    for name in ("relay", "gateway"):
        print(f"p99 (ms) of the messages sent in each 5 s, {name}: {timeline(list(trips[name].values()))}")
    print("\nthe gateway's phases (catalog times; each percentile on its own, so they do not add up):")
    print("\n".join(phase_table(list(gateway.values()), GATEWAY_PHASES)))
    print(busy_fetch_lane(list(gateway.values()), fetch_workers(code, overrides)))
    if wal is not None:
        print("\nthe gateway's catalog writes during its slices (bench_job_marks is this bench's own trigger's table):")
        print(wal.table(len(gateway)))
    ratio50, ratio99 = g["p50"] / r["p50"], g["p99"] / r["p99"]
    if args.relay_records:  # not the baseline: no verdict
        print(f"\ngateway / relay recording what it stored (not B7's baseline): p50 {ratio50:.2f}x, "
              f"p99 {ratio99:.2f}x; received relay {r['received']:.0f}/{r['sent']:.0f}, gateway "
              f"{g['received']:.0f}/{g['sent']:.0f}; load average after {loadavg()}", flush=True)
        return 0 if r["received"] == r["sent"] and g["received"] == g["sent"] else 1
    verdict = "PASS" if ratio99 <= TARGET_P99_RATIO else "FAIL"
    print(f"\nB7 gateway / relay: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x (target p99 <= {TARGET_P99_RATIO}x: "
          f"{verdict}); received relay {r['received']:.0f}/{r['sent']:.0f}, gateway "
          f"{g['received']:.0f}/{g['sent']:.0f}; load average after {loadavg()}", flush=True)
    return 0 if r["received"] == r["sent"] and g["received"] == g["sent"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
