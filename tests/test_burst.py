"""Under a burst (issue 12): group commits in the SQLite catalog, the job queue's fetch and deliver
lanes, the fetch lane's deadline order, and the media backlog's metric, readiness and log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from gateway.admission import Admission
from gateway.catalog import SQLiteCatalog
from gateway.catalog.sqlite.connection import CHECKPOINT_INTERVAL
from gateway.config import QueueSettings
from gateway.delivery import Deliverer, Forwards
from gateway.ingest import Arrivals
from gateway.keys import QUEUE
from gateway.jobs import Backlogged, Job, JobQueue
from gateway.metrics import Metrics
from tests.conftest import MEDIA, base_config, deep_merge, waha_payload
from tests.daemon import GatewayProcess, write_toml
from tests.emulators.waha import WahaEmulator
from tests.test_catalog_contract import T0, _event, _media, _rule
from tests.test_catalog_jobs import catalog  # noqa: F401  (the fixture: a real SQLite catalog)

FAST = dict(backoff_base=0.01, backoff_max=0.02, poll_interval=0.05)


# -- group commit ---------------------------------------------------------------------------------

async def test_concurrent_webhooks_share_commits(catalog):
    sizes: list[int] = []
    catalog.on_commit = lambda writes, durable: sizes.append(writes)
    results = await asyncio.gather(*(catalog.record_webhook("waha", b"{}", [_event(f"g{i}")])
                                     for i in range(200)))
    assert all(len(accepted) == 1 and not dup for accepted, dup, _ in results)
    assert await catalog.count("events") == 200 and await catalog.count("jobs", "kind='ingest'") == 200
    assert sum(sizes) == catalog.committed_writes == 200
    assert catalog.commits == len(sizes) < 200 / 4, sizes  # the webhooks waiting together share a commit
    assert max(sizes) > 1


async def test_a_failing_write_in_a_group_undoes_only_itself(catalog):
    def boom(db):
        db.conn.execute("INSERT INTO jobs (kind, key, payload, state, attempts, run_at, created_at, updated_at)"
                        " VALUES ('x', 'half-done', '{}', 'queued', 0, 0, 0, 0)")
        raise ValueError("boom")

    outcomes = await asyncio.gather(
        catalog.record_webhook("waha", b"{}", [_event("before")]),
        catalog.write(boom),
        catalog.record_webhook("waha", b"{}", [_event("after")]),
        return_exceptions=True)
    assert isinstance(outcomes[1], ValueError)
    assert [len(o[0]) for o in (outcomes[0], outcomes[2])] == [1, 1]
    assert await catalog.count("events") == 2
    assert await catalog.count("jobs", "key = 'half-done'") == 0


async def test_claims_waiting_together_share_a_commit_and_never_hand_a_job_twice(catalog):
    for i in range(40):
        await catalog.enqueue("deliver", f"deliver:{i}", {"n": i})
    before = catalog.commits
    claimed = await asyncio.gather(*(catalog.claim_job() for _ in range(50)))
    ids = [c["id"] for c in claimed if c is not None]
    assert len(ids) == len(set(ids)) == 40
    assert catalog.commits - before < 50 / 4


async def test_a_claim_commits_without_fsync_and_leaves_every_other_transaction_durable(catalog):
    await catalog.enqueue("deliver", "deliver:sync", {"n": 1})
    levels: list[int] = []

    def durable_write(db):  # the level its commit gets, as SQLite reports it inside the group
        levels.append(db.conn.execute("PRAGMA synchronous").fetchone()[0])

    def claim_only(db):
        levels.append(db.conn.execute("PRAGMA synchronous").fetchone()[0])

    await catalog.write(claim_only, durable=False)
    assert await catalog.claim_job() is not None
    await catalog.write(durable_write)
    level = await catalog.run(lambda db: db.conn.execute("PRAGMA synchronous").fetchone()[0])
    assert levels == [1, 2] and level == 2  # NORMAL for the claim-only group, FULL again after it


async def test_an_ingest_commits_its_media_row_with_its_completion_and_a_delivery_done_without_fsync(catalog):
    [eid], _, [job] = await catalog.record_webhook("waha", b"{}", [_event("no-fsync")], claim={"ingest"})
    commits, durable = catalog.commits, catalog.durable_commits
    await catalog.complete_job(job["id"], [("deliver", f"deliver:{eid}:bot", {"event_id": eid})], claim=True,
                               media=[_media(1)])  # the ingest's row and its completion: one commit
    [delivery] = await catalog.list_jobs(kind="deliver")
    await catalog.complete_job(delivery["id"], durable=False)  # at least once: a repeat is allowed
    assert (catalog.commits - commits, catalog.durable_commits - durable) == (2, 1)  # the completion's fsync
    await catalog.insert_media(_media(2))  # durable (the files API answers 201 after it)
    assert catalog.durable_commits - durable == 2
    assert {j["state"] for j in await catalog.list_jobs()} == {"done"}
    assert await catalog.get_media(_media(1)["id"]) is not None


@contextlib.asynccontextmanager
async def holding(run: Callable[[Callable[[Any], None]], Awaitable[None]]) -> AsyncIterator[asyncio.Task[None]]:
    """Hold the catalog thread that ``run`` (``catalog.write``, ``catalog.scan``) uses, with a call
    that waits until the block ends; yields that call's task."""
    started, release = threading.Event(), threading.Event()

    def hold(db: Any) -> None:
        started.set()
        release.wait(10)

    task = asyncio.create_task(run(hold))
    assert await asyncio.to_thread(started.wait, 10)
    try:
        yield task
    finally:
        release.set()
        await task


async def test_reads_do_not_wait_behind_a_commit(catalog):
    [event_id], _, _ = await catalog.record_webhook("waha", b"{}", [_event("read-me")])
    async with holding(catalog.write) as write:  # the catalog thread, inside its transaction
        row = await asyncio.wait_for(catalog.get_event(event_id), 5)
        assert row is not None and row["message_id"] == "read-me" and not write.done()


async def test_a_scan_over_every_row_holds_up_no_read(catalog):
    """The metrics' counts scan every job and media row (seconds on a large catalog); readiness,
    the media backlog and serving read on a thread of their own meanwhile."""
    [event_id], _, _ = await catalog.record_webhook("waha", b"{}", [_event("read-me")], claim={"ingest"})
    async with holding(catalog.scan):
        stats = asyncio.create_task(catalog.stats())  # queued behind the held scan
        assert await asyncio.wait_for(catalog.media_backlog(), 5) is None  # claimed: nothing waits
        assert (await asyncio.wait_for(catalog.get_event(event_id), 5))["message_id"] == "read-me"
        await asyncio.sleep(0.05)
        assert not stats.done()
    assert (await stats).jobs == {("ingest", "running"): 1}


async def test_a_cleanup_runs_counts_hold_up_no_commit(catalog):
    """A cleanup run counts every expired media row and (dry run) every prunable event first: on a
    catalog of a million rows that reads for most of a second, which the webhooks' commits must
    not wait behind. So the counts, a dry run's selection and the totals answer while the catalog
    thread is held; the claim, whose check must share the transaction, waits for it."""
    await catalog.insert_media(_media(1))
    [event_id], _, _ = await catalog.record_webhook("waha", b"{}", [_event("kept")], now=T0)
    rule = _rule()
    async with holding(catalog.write) as write:
        claim = asyncio.create_task(catalog.expired_media(rule, "", 10, claim=True))
        assert await asyncio.wait_for(catalog.count_expired_media(rule), 5) == (1, 0, 100)
        [row] = await asyncio.wait_for(catalog.expired_media(rule, "", 10, claim=False), 5)
        assert row["id"] == _media(1)["id"] and row["reason"] == "age" and not row["in_use"]
        assert await asyncio.wait_for(catalog.count_prunable(T0 + 1, None), 5) == (0, 0)  # its job is queued
        assert await asyncio.wait_for(catalog.media_totals(), 5) == [("local", "waha", "image", 1, 100)]
        assert not write.done() and not claim.done()
    assert [r["id"] for r in await claim] == [_media(1)["id"]]
    assert (await catalog.get_media(_media(1)["id"]))["state"] == "deleting"
    assert (await catalog.get_event(event_id)) is not None


async def test_the_catalog_thread_checkpoints_the_wal_when_it_is_idle(catalog):
    """SQLite's own checkpoint (every 1,000 WAL pages) runs inside a commit that webhooks wait for;
    the catalog thread copies the WAL into the database file when it has nothing else to do
    instead. Read without the WAL (``immutable=1``), the file has a commit only after that."""
    def in_file(message_id: str) -> int:
        conn = sqlite3.connect(f"file:{catalog.path}?immutable=1", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM events WHERE message_id = ?", (message_id,)).fetchone()[0]
        finally:
            conn.close()

    async def checkpointed(count: int) -> None:
        deadline = time.monotonic() + 5
        while catalog.checkpoints < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    await catalog.record_webhook("waha", b"{}", [_event("first")])
    await checkpointed(1)
    assert await asyncio.to_thread(in_file, "first") == 1
    before = catalog.checkpoints
    async with holding(catalog.run):  # queued together: the webhook's commit, then a read right after it
        webhook = asyncio.create_task(catalog.record_webhook("waha", b"{}", [_event("ckpt")]))
        right_after = asyncio.create_task(catalog.run(lambda db: in_file("ckpt")))
        await asyncio.sleep(0.05)
    assert len((await webhook)[0]) == 1
    assert await right_after == 0  # durable in the WAL, not yet in the file
    await checkpointed(before + 1)
    assert catalog.checkpoints == before + 1 and await asyncio.to_thread(in_file, "ckpt") == 1
    await asyncio.sleep(2 * CHECKPOINT_INTERVAL)
    assert catalog.checkpoints == before + 1  # nothing written since: nothing to checkpoint


async def test_overlapping_scrapes_share_one_catalog_read(tmp_path):
    class CountingCatalog(SQLiteCatalog):  # the real catalog, its stats() counted and held
        calls = 0
        gate: asyncio.Event

        async def stats(self):
            type(self).calls += 1
            await self.gate.wait()
            return await super().stats()

    catalog = CountingCatalog(tmp_path / "c.db")
    catalog.gate = asyncio.Event()
    await catalog.open()
    try:
        await catalog.record_webhook("waha", b"{}", [_event("queued")])
        metrics = Metrics()
        scrapes = [asyncio.create_task(metrics.refresh(catalog, ["ingest", "deliver"])) for _ in range(3)]
        await asyncio.sleep(0.05)
        catalog.gate.set()
        await asyncio.gather(*scrapes)
        assert CountingCatalog.calls == 1
        assert metrics.jobs.labels("ingest", "queued")._value.get() == 1
        await metrics.refresh(catalog, ["ingest", "deliver"])  # the next scrape reads again
        assert CountingCatalog.calls == 2
    finally:
        await catalog.close()


async def test_a_delivery_missing_from_the_cache_reads_its_body_from_the_catalog(start_gateway, sink):
    gw = await start_gateway()
    deliverer = gw.app[QUEUE].handlers["deliver"]
    assert isinstance(deliverer, Deliverer)
    deliverer.forwards = Forwards(size=0)  # as when another replica rewrote the event: nothing remembered here
    await gw.post_waha(_text_payload("cache-miss"))
    [delivery] = await sink.wait_for(1)
    assert delivery.json["payload"]["body"] == "text cache-miss"
    assert delivery.json["gateway"]["event_id"] == delivery.headers["Idempotency-Key"]
    assert deliverer.forwards.get(delivery.headers["Idempotency-Key"]) is None


def test_forwards_keep_the_latest_bodies_up_to_their_size():
    forwards = Forwards(size=20)  # bytes: room for two of these bodies (8 and 9 bytes with its own count), not three
    for n in range(3):
        forwards.remember(f"ev_{n}", "message", {"n": n})
    forwards.remember("ev_1", "message.any", {"n": 11})  # a rewrite again replaces the body
    assert forwards.get("ev_0") is None
    assert forwards.get("ev_1") == ("message.any", b'{"n":11}') and forwards.get("ev_2") == ("message", b'{"n":2}')


def test_arrivals_are_taken_once_and_bounded_by_body_bytes():
    arrivals = Arrivals(size=1000)
    events = {n: _event(f"arr{n}") for n in range(3)}
    arrivals.remember("ev_0", "waha", events[0], 400)
    arrivals.remember("ev_1", "waha", events[1], 400)
    arrivals.remember("ev_2", "waha", events[2], 400)  # 1,200 bytes: the oldest goes
    arrivals.remember("ev_big", "waha", events[0], 5000)  # over the whole size: not kept
    assert arrivals.take("ev_0") is None and arrivals.take("ev_big") is None
    assert arrivals.take("ev_1") == ("waha", events[1])
    assert arrivals.take("ev_1") is None  # an ingest takes it out: a retry reads the catalog


def _text_payload(message_id: str) -> dict[str, object]:
    data = waha_payload(None, message_id=message_id)
    data["payload"].update(hasMedia=False, media=None, body=f"text {message_id}")
    return data


def _daemon(tmp_path: Path, port: int, waha, sink, **overrides) -> GatewayProcess:
    data = deep_merge(base_config(tmp_path, port, waha, sink), overrides)
    return GatewayProcess(write_toml(tmp_path / "gateway.toml", data), port, tmp_path / "daemon.log")


async def test_sigkill_during_concurrent_webhooks_loses_no_acknowledged_one(tmp_path, waha, sink, unused_tcp_port):
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink)
    await daemon.start()
    acknowledged: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            async def post(i: int) -> None:
                body = json.dumps(_text_payload(f"burst-{i}"))
                async with http.post(f"{daemon.url}/webhooks/waha", data=body) as r:
                    assert r.status == 200
                    acknowledged.append(f"burst-{i}")

            async def flood() -> None:
                await asyncio.gather(*(post(i) for i in range(2000)), return_exceptions=True)

            task = asyncio.create_task(flood())
            while len(acknowledged) < 300:
                await asyncio.sleep(0.005)
            async with aiohttp.ClientSession() as scrape, scrape.get(f"{daemon.url}/metrics") as r:
                text = await r.text()
            acknowledged_at_scrape = len(acknowledged)
            daemon.kill()  # mid-flood: requests are in flight and in uncommitted groups
            await task
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.kill()
    assert len(acknowledged) < 2000, "the kill came too late to test anything"
    commits = next(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("gateway_catalog_commits_total "))
    # far fewer commits than acknowledged webhooks (whose jobs' claims and completions commit too)
    assert 0 < commits < acknowledged_at_scrape / 2
    conn = sqlite3.connect(tmp_path / "var" / "gateway.db")
    try:
        stored = {row[0] for row in conn.execute("SELECT message_id FROM events")}
    finally:
        conn.close()
    assert set(acknowledged) <= stored


# -- lanes and deadlines --------------------------------------------------------------------------

async def test_fetch_lane_takes_the_earliest_deadline_first(catalog):
    catalog.media_lifetimes = {"slow": 3600.0, "fast": 60.0}
    await catalog.record_webhook("slow", b"{}", [_event("a")], now=1000.0)
    await catalog.record_webhook("fast", b"{}", [_event("b")], now=1010.0)   # deadline 1070
    await catalog.record_webhook("fast", b"{}", [_event("c")], now=1005.0)   # deadline 1065
    order = []
    while (job := await catalog.claim_job(now=2000.0, kinds=["ingest"])) is not None:
        event = await catalog.get_event(job["payload"]["event_id"])
        order.append(event["message_id"])
    assert order == ["c", "b", "a"]


async def test_deliveries_are_not_stuck_behind_a_download_backlog(catalog):
    for i in range(30):
        await catalog.record_webhook("waha", b"{}", [_event(f"m{i}")])
    await catalog.enqueue("deliver", "deliver:urgent", {"event_id": "x"})
    delivered = asyncio.Event()
    downloads_started = 0
    release = asyncio.Event()

    async def ingest(job: Job) -> None:
        nonlocal downloads_started
        downloads_started += 1
        await release.wait()  # every fetch worker busy on a slow download

    async def deliver(job: Job) -> None:
        delivered.set()

    q = JobQueue(catalog, QueueSettings(workers=1, fetch_workers=3, **FAST), Metrics(),
                 {"ingest": ingest, "deliver": deliver})
    await q.start()
    try:
        await asyncio.wait_for(delivered.wait(), 5)
        assert downloads_started == 3  # the fetch lane's own concurrency, no more
    finally:
        release.set()
        await q.stop(grace=1.0)


async def test_a_backlog_near_its_deadline_is_a_metric_readiness_and_one_warning(catalog, caplog):
    catalog.default_media_lifetime = 100.0
    now = time.time()
    await catalog.record_webhook("waha", b"{}", [_event("old")], now=now - 60)
    metrics = Metrics()
    q = JobQueue(catalog, QueueSettings(backlog_ready_fraction=0.5, **FAST), metrics, {})
    with caplog.at_level(logging.INFO, logger="gateway.jobs"):
        assert await q.check_backlog(now) is not None
        assert await q.check_backlog(now) is not None
        with pytest.raises(Backlogged, match="60s old"):
            await q.check()
        assert metrics.registry.get_sample_value("gateway_media_backlog_oldest_seconds") == pytest.approx(60)
        assert metrics.registry.get_sample_value("gateway_media_backlog_deadline_ratio") == pytest.approx(0.6)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot keep up" in warnings[0].getMessage()

        [job] = await catalog.list_jobs(kind="ingest")
        await catalog.claim_job(kinds=["ingest"])
        await catalog.complete_job(job["id"])
        assert await q.check_backlog(now) is None
        await q.check()
        assert metrics.registry.get_sample_value("gateway_media_backlog_oldest_seconds") == 0
    assert any("caught up" in r.getMessage() for r in caplog.records)


async def test_a_young_backlog_is_ready(catalog):
    now = time.time()
    await catalog.record_webhook("waha", b"{}", [_event("young")], now=now - 10)
    q = JobQueue(catalog, QueueSettings(**FAST), Metrics(), {})
    assert await q.check_backlog(now) is None  # 10 of 180 s
    await q.check()


async def test_readyz_says_when_the_gateway_cannot_keep_up(tmp_path, waha, sink, unused_tcp_port):
    """A daemon whose one fetch worker is stuck on a slow download, with media waiting past the
    configured share of its deadline: ``/readyz`` is 503 naming the backlog, and 200 again once the
    media is stored."""
    from tests.test_crash_safety import _daemon
    from tests.test_faults import _post_waha

    waha.delay = 2.5  # each download waits this long before its headers
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink,
                     queue={"fetch_workers": 1, "media_deadline": 2.0, "backlog_ready_fraction": 0.25})
    await daemon.start()
    try:
        for i in range(2):
            await _post_waha(daemon, waha.add_file(MEDIA / "photo.jpg"), f"slow-{i}", "photo.jpg")
        async with aiohttp.ClientSession() as http:
            for _ in range(60):
                async with http.get(f"{daemon.url}/readyz") as r:
                    body = await r.json()
                    if r.status == 503:
                        break
                await asyncio.sleep(0.1)
            assert r.status == 503 and "oldest waiting media" in body["backlog"], body
            assert (body["catalog"], body["storage"]) == ("ok", "ok")
            await sink.wait_for(2, timeout=30)
            for _ in range(60):
                async with http.get(f"{daemon.url}/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert r.status == 200
        assert await daemon.terminate() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("the gateway cannot keep up") == 1 and "caught up" in log


# -- holding back media webhooks the fetch lane could not store in time ------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _admission(**settings) -> tuple[Admission, Metrics, _Clock]:
    metrics, clock = Metrics(), _Clock()
    return Admission(QueueSettings(fetch_workers=2, **settings), metrics, lambda provider: 100.0, clock), metrics, clock


async def test_admission_measures_the_store_rate_only_while_the_lane_is_saturated():
    adm, metrics, clock = _admission(admission_fraction=0.5, admission_hold=0)
    adm.observe(1)  # below fetch_workers: completions follow arrivals
    clock.now = 5.0
    adm.finished()
    assert adm.rate is None and adm.estimate() == 0
    assert await adm.admit("waha", 3000) is None  # no rate known: admitted, and counted as waiting
    clock.now = 7.0
    for _ in range(20):
        adm.finished()
    adm.observe(2980)
    assert adm.rate == pytest.approx(10.0)  # 20 stored in the 2 s since the lane filled up
    assert adm.estimate() == pytest.approx(298.0)
    assert metrics.registry.get_sample_value("gateway_media_store_estimate_seconds") == pytest.approx(298.0)
    assert await adm.admit("waha") == 10  # 298 s > 0.5 × 100 s: held back, Retry-After bounded
    clock.now = 20.0
    adm.observe(2980)  # nothing stored for 13 s: a stalled lane is slow, not unknown
    assert adm.rate == pytest.approx(1 / 10) and adm.estimate() > 10_000
    adm.observe(0)
    assert adm.estimate() == 0


async def test_admission_holds_a_webhook_until_there_is_room():
    adm, _, clock = _admission(admission_fraction=0.5, admission_hold=5.0)
    adm.observe(600)
    clock.now = 1.0
    for _ in range(10):
        adm.finished()
    adm.observe(502)  # 10/s, 502 waiting: 50.2 s > 0.5 × 100 s
    assert adm.estimate() == pytest.approx(50.2)
    held = asyncio.create_task(adm.admit("waha"))
    await asyncio.sleep(0.05)
    assert not held.done()
    adm.finished()
    adm.finished()  # 500 waiting at 12/s: room
    assert await asyncio.wait_for(held, 1) is None
    assert adm.waiting == 501


async def test_behind_media_webhooks_get_503_and_retry_after_caught_up_200(tmp_path, waha, sink, unused_tcp_port):
    """A daemon whose one fetch worker stores about 6 media/s, with a 4 s media deadline (room: 2 s
    of work), gets 40 media webhooks at once: once the lane is measured, a media webhook is answered
    503 with Retry-After and is not stored; a text webhook is still accepted; once the backlog is
    stored, the same webhook gets 200."""
    waha.delay = 0.15
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, log={"level": "INFO"},
                     queue={"fetch_workers": 1, "media_deadline": 4.0, "admission_fraction": 0.5,
                            "admission_hold": 0.2})
    await daemon.start()
    photo = waha.add_file(MEDIA / "photo.jpg")
    try:
        async with aiohttp.ClientSession() as http:
            async def post(payload: dict) -> aiohttp.ClientResponse:
                async with http.post(f"{daemon.url}/webhooks/waha", data=json.dumps(payload)) as r:
                    await r.read()
                    return r

            burst = await asyncio.gather(*(post(waha_payload(photo, message_id=f"early-{i}")) for i in range(40)))
            admitted = sum(r.status == 200 for r in burst)
            assert admitted >= 10 and all(r.status in (200, 503) for r in burst), [r.status for r in burst]
            for i in range(50):  # the lane's rate is measured after half a second of backlog
                refused = waha_payload(photo, message_id=f"refused-{i}")
                r = await post(refused)
                if r.status == 503:
                    break
                admitted += 1
                await asyncio.sleep(0.05)
            assert r.status == 503 and "behind" in (await r.json())["error"]
            assert 1 <= int(r.headers["Retry-After"]) <= 10
            r = await post(_text_payload("text-while-behind"))
            assert r.status == 200  # without media: nothing to lose
            async with http.get(f"{daemon.url}/metrics") as m:
                text = await m.text()
            held = float(text.split('gateway_webhooks_received_total{outcome="held_back",provider="waha"} ')[1].split()[0])
            assert held >= 1
            assert 'gateway_media_admission_holding{provider="waha"} 1.0' in text

            delivered = await sink.wait_for(admitted + 1, timeout=60)
            assert refused["payload"]["id"] not in {d.json["payload"]["id"] for d in delivered}
            conn = sqlite3.connect(tmp_path / "var" / "gateway.db")
            try:
                assert conn.execute("SELECT COUNT(*) FROM events WHERE message_id=?",
                                    (refused["payload"]["id"],)).fetchone()[0] == 0
            finally:
                conn.close()
            for _ in range(100):  # caught up: the same webhook is accepted
                r = await post(refused)
                if r.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status == 200
            await sink.wait_for(admitted + 2, timeout=30)
        assert await daemon.terminate() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("media webhooks of waha held back") == 1 and log.count("caught up (storing") == 1, log


async def test_the_waha_emulator_deletes_each_message_file_after_its_own_webhook(waha):
    """The B4 emulator mode: per-message URLs of one registered file, each answering 404 from
    ``delete_after`` seconds after its webhook was first sent (the time in the URL)."""
    waha.delete_after = 60.0
    waha.add_file(MEDIA / "photo.jpg")
    now = time.time()
    fresh = WahaEmulator.message_file_url(waha.base_url, "m-1", now - 59, "photo.jpg")
    stale = WahaEmulator.message_file_url(waha.base_url, "m-2", now - 61, "photo.jpg")
    async with aiohttp.ClientSession(headers={"X-Api-Key": waha.api_key}) as http:
        async with http.get(fresh) as r:
            assert r.status == 200 and await r.read() == (MEDIA / "photo.jpg").read_bytes()
        async with http.get(stale) as r:
            assert r.status == 404 and "deleted 60 s after the webhook" in (await r.json())["message"]
        async with http.get(WahaEmulator.message_file_url(waha.base_url, "m-3", now, "other.jpg")) as r:
            assert r.status == 404  # not a registered file
        async with http.get(f"{waha.base_url}/_emulator/stats") as r:
            assert await r.json() == {"deleted_hits": 1, "message_files_served": 1}


@pytest.mark.parametrize("values", [{"admission_fraction": 0}, {"admission_fraction": 1.5},
                                    {"admission_hold": -1}, {"admission_hold": 31}])
def test_admission_settings_are_validated(values):
    with pytest.raises(ValidationError, match=next(iter(values))):
        QueueSettings(**values)
