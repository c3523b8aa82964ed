"""gateway.catalog (real SQLite in tmp_path) and gateway.jobs (backoff, the JobQueue end to end)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from gateway.catalog import SCHEMA_VERSION, Catalog, CatalogError, MediaTaken
from gateway.catalog.sqlite.migrations import MIGRATIONS
from gateway.config import QueueSettings
from gateway.jobs import MAX_REVISIONS, Job, JobQueue, JobResult, PermanentError, backoff_delay
from gateway.metrics import Metrics
from gateway.sdk.provider import MediaRef
from tests.test_catalog_contract import T0, _event, _media

@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[Catalog]:
    c = Catalog(tmp_path / "var" / "gateway.db")
    await c.open()
    yield c
    await c.close()


def _sql(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- opening --------------------------------------------------------------------------------------

async def test_catalog_opens_in_wal_mode_with_the_schema_version(tmp_path):
    path = tmp_path / "sub" / "dir" / "gateway.db"  # directories are created
    c = Catalog(path)
    await c.open()
    try:
        assert await c.run(lambda db: db.conn.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert await c.run(lambda db: db.conn.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
        assert await c.schema_version() == SCHEMA_VERSION
        await c.check()
        assert await c.count("events") == await c.count("jobs") == await c.count("media") == 0
    finally:
        await c.close()
    # persistent on disk, as another connection sees it
    assert _sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert _sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_catalog_reopens_with_its_data(tmp_path):
    path = tmp_path / "gateway.db"
    c = Catalog(path)
    await c.open()
    accepted, _, _ = await c.record_webhook("waha", b"{}", [_event("k1")], now=T0)
    await c.close()
    await c.close()  # idempotent

    c2 = Catalog(path)
    await c2.open()
    try:
        assert await c2.schema_version() == SCHEMA_VERSION
        assert (await c2.get_event(accepted[0]))["idempotency_key"] == "k1"
        assert await c2.count("jobs") == 1
    finally:
        await c2.close()


async def test_a_catalog_of_schema_4_loses_the_redundant_job_index_and_keeps_its_jobs(tmp_path):
    """Migration 5 drops ``idx_jobs_state_run_at``, which every claim and completion rewrote and
    no query needs (the lane indexes serve them); the jobs and the other indexes stay."""
    path = tmp_path / "gateway.db"
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    for number, migration in enumerate(MIGRATIONS[:4]):
        migration(db)
        conn.execute(f"PRAGMA user_version={number + 1}")
    conn.execute("INSERT INTO jobs (kind, key, payload, state, attempts, run_at, created_at, updated_at)"
                 " VALUES ('deliver', 'deliver:old', '{}', 'queued', 0, 0, 0, 0)")
    conn.close()
    assert ("idx_jobs_state_run_at",) in _sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'")
    c = Catalog(path)
    await c.open()
    try:
        assert await c.schema_version() == SCHEMA_VERSION >= 5
        assert (await c.claim_job(kinds=["deliver"]))["key"] == "deliver:old"
    finally:
        await c.close()
    indexes = {name for (name,) in _sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'"
                                              " AND tbl_name = 'jobs'")}
    assert "idx_jobs_state_run_at" not in indexes
    assert {"idx_jobs_key", "idx_jobs_event_id", "idx_jobs_lane", "idx_jobs_kind_run_at"} <= indexes


async def test_catalog_from_a_newer_gateway_is_refused(tmp_path):
    path = tmp_path / "gateway.db"
    c = Catalog(path)
    await c.open()
    await c.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    c2 = Catalog(path)
    with pytest.raises(CatalogError):
        await c2.open()
    await c2.close()


async def test_a_closed_catalog_raises(tmp_path):
    c = Catalog(tmp_path / "gateway.db")
    with pytest.raises(CatalogError):
        await c.check()
    await c.close()


# -- events ---------------------------------------------------------------------------------------

async def test_record_webhook_commits_events_and_ingest_jobs(catalog, tmp_path):
    raw = b'{"event":"message"}'
    accepted, dups, _ = await catalog.record_webhook("waha", raw, [_event("k1", media=2), _event("k2")], now=T0)
    assert dups == [] and len(accepted) == 2 and len(set(accepted)) == 2
    ev = await catalog.get_event(accepted[0])
    assert ev["provider"] == "waha" and ev["raw"] == raw and ev["state"] == "queued"
    assert ev["payload"] == {"id": "k1", "body": "hi"}
    assert [MediaRef.from_dict(m).source_key for m in ev["media"]] == ["src:k1:0", "src:k1:1"]
    assert (ev["account"], ev["chat"], ev["message_id"], ev["received_at"]) == ("default", "123@c.us", "k1", T0)
    jobs = await catalog.list_jobs()
    assert [(j["kind"], j["key"], j["payload"], j["state"], j["attempts"], j["run_at"]) for j in jobs] == [
        ("ingest", f"ingest:{eid}", {"event_id": eid}, "queued", 0, T0) for eid in accepted]
    # committed: another connection sees them while the catalog is open
    assert _sql(catalog.path, "SELECT COUNT(*) FROM events") == [(2,)]
    assert _sql(catalog.path, "SELECT COUNT(*) FROM jobs WHERE kind='ingest'") == [(2,)]


# -- backoff --------------------------------------------------------------------------------------

def test_backoff_grows_exponentially_within_its_jitter_band():
    rng = random.Random(1234)
    base, cap = 0.5, 1000.0
    previous = 0.0
    for attempt in range(1, 12):
        upper = base * 2 ** (attempt - 1)
        samples = [backoff_delay(attempt, base, cap, rng) for _ in range(50)]
        assert all(upper / 2 <= s <= upper for s in samples), attempt
        assert min(samples) >= previous  # the bands [d/2, d] never go backwards
        assert max(samples) > upper * 0.9 and min(samples) < upper * 0.6  # jitter spreads the band
        previous = max(samples)


def test_backoff_is_capped():
    rng = random.Random(7)
    for attempt in range(10, 60):  # 2.0 * 2**9 = 1024 > 600
        d = backoff_delay(attempt, 2.0, 600.0, rng)
        assert 300.0 <= d <= 600.0
    assert 300.0 <= backoff_delay(10, 2.0, 600.0, rng) <= 600.0


def test_backoff_first_attempt_and_determinism():
    assert 1.0 <= backoff_delay(1, 2.0, 600.0, random.Random(0)) <= 2.0
    a = [backoff_delay(n, 2.0, 600.0, random.Random(42)) for n in range(1, 15)]
    b = [backoff_delay(n, 2.0, 600.0, random.Random(42)) for n in range(1, 15)]
    assert a == b


def test_backoff_is_capped_for_any_attempt_number():
    rng = random.Random(3)
    for attempt in (1024, 1025, 5000, 10**6):
        assert 300.0 <= backoff_delay(attempt, 2.0, 600.0, rng) <= 600.0


# -- JobQueue end to end --------------------------------------------------------------------------

FAST = dict(workers=2, backoff_base=0.01, backoff_max=0.02, poll_interval=0.05)


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _job_in_state(catalog: Catalog, job_id: int, state: str, timeout: float = 5.0) -> dict[str, Any]:
    async def check() -> bool:
        return (await catalog.get_job(job_id))["state"] == state
    await _wait_for(check, timeout)
    return await catalog.get_job(job_id)


async def _one_job(catalog: Catalog, kind: str = "ingest") -> int:
    assert await catalog.enqueue(kind, f"{kind}:1", {"n": 1})
    [job] = await catalog.list_jobs(kind=kind)
    return job["id"]


def _processed(metrics: Metrics, kind: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(
        "gateway_jobs_processed_total", {"kind": kind, "outcome": outcome}) or 0.0


@pytest.fixture
async def run_queue(catalog) -> AsyncIterator[Callable[..., Awaitable[tuple[JobQueue, Metrics]]]]:
    queues: list[JobQueue] = []

    async def _start(handlers: dict[str, Any], **settings: Any) -> tuple[JobQueue, Metrics]:
        metrics = Metrics()
        q = JobQueue(catalog, QueueSettings(**{**FAST, **settings}), metrics, handlers)
        await q.start()
        queues.append(q)
        return q, metrics

    yield _start
    for q in queues:
        await q.stop(grace=1.0)


@pytest.mark.parametrize("failures", [0, 1, 3])
async def test_queue_retries_until_the_handler_succeeds(catalog, run_queue, failures):
    job_id = await _one_job(catalog)
    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)
        if len(seen) <= failures:
            raise ConnectionError(f"try {len(seen)}")

    q, metrics = await run_queue({"ingest": handler}, max_attempts=5)
    q.notify()
    row = await _job_in_state(catalog, job_id, "done")
    assert row["attempts"] == failures + 1
    assert row["last_error"] is None
    assert [j.attempts for j in seen] == list(range(1, failures + 2))
    assert [j.last_attempt for j in seen] == [False] * (failures + 1)
    assert seen[0].payload == {"n": 1} and seen[0].kind == "ingest" and seen[0].key == "ingest:1"
    assert _processed(metrics, "ingest", "retry") == failures
    assert _processed(metrics, "ingest", "done") == 1


async def test_queue_handler_that_always_fails_goes_dead(catalog, run_queue):
    job_id = await _one_job(catalog)
    calls: list[Job] = []

    async def handler(job: Job) -> None:
        calls.append(job)
        raise RuntimeError(f"nope #{job.attempts}")

    _, metrics = await run_queue({"ingest": handler}, max_attempts=3)
    row = await _job_in_state(catalog, job_id, "dead")
    assert row["attempts"] == 3
    assert row["last_error"] == "RuntimeError: nope #3"
    assert len(calls) == 3 and calls[-1].last_attempt and not calls[-2].last_attempt
    assert _processed(metrics, "ingest", "retry") == 2
    assert _processed(metrics, "ingest", "dead") == 1


async def test_queue_permanent_error_is_dead_at_once(catalog, run_queue):
    job_id = await _one_job(catalog)
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("media URL is gone for good")

    _, metrics = await run_queue({"ingest": handler}, max_attempts=5)
    row = await _job_in_state(catalog, job_id, "dead")
    assert row["attempts"] == 1 and calls == 1
    assert "media URL is gone for good" in row["last_error"]
    assert _processed(metrics, "ingest", "dead") == 1 and _processed(metrics, "ingest", "retry") == 0


@pytest.mark.parametrize("revises", [True, False])
async def test_a_completion_refused_for_a_recorded_copy_commits_the_revised_result_or_retries(
        catalog, run_queue, revises):
    job_id = await _one_job(catalog)
    await catalog.insert_media(_media(1))  # a copy recorded meanwhile (another replica, or before a restart)
    taken: list[list[str]] = []
    calls = 0

    async def handler(job: Job) -> JobResult:
        nonlocal calls
        calls += 1
        ours = _media(2, source_key="src:1")

        async def revise(exc: MediaTaken) -> JobResult:
            taken.append(exc.source_keys)
            return JobResult(media=[] if revises else [ours], taken=revise)

        return JobResult(media=[ours], taken=revise)

    _, metrics = await run_queue({"ingest": handler}, max_attempts=5, backoff_base=60, backoff_max=60)
    if revises:
        await _job_in_state(catalog, job_id, "done")
        assert taken == [["src:1"]] and calls == 1
    else:  # revised in vain, MAX_REVISIONS times: retried later, the attempt counted
        async def deferred() -> bool:
            row = await catalog.get_job(job_id)
            return row["state"] == "queued" and row["attempts"] == 1
        await _wait_for(deferred)
        row = await catalog.get_job(job_id)
        assert taken == [["src:1"]] * MAX_REVISIONS and calls == 1
        assert row["last_error"].startswith("deferred: ") and "src:1" in row["last_error"]
        assert _processed(metrics, "ingest", "retry") == 1
    assert await catalog.get_media(_media(2)["id"]) is None and await catalog.count("media") == 1


async def test_a_job_whose_outcome_the_catalog_could_not_record_is_queued_again_once_it_answers(
        catalog, run_queue, caplog):
    """The catalog refuses to record any outcome (done, or queued again): the worker lives on, and
    the job goes back to the queue once the catalog answers, then runs again."""
    await catalog.write(lambda db: db.conn.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE OF state ON jobs WHEN NEW.state IN ('done', 'queued')"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    job_id = await _one_job(catalog)
    runs = 0

    async def handler(job: Job) -> None:
        nonlocal runs
        runs += 1

    await run_queue({"ingest": handler}, workers=1, max_attempts=5)
    await _wait_for(lambda: _true(any("could not record its outcome" in r.message for r in caplog.records)))
    assert runs == 1 and (await catalog.get_job(job_id))["state"] == "running"
    await catalog.write(lambda db: db.conn.execute("DROP TRIGGER refuse"))
    row = await _job_in_state(catalog, job_id, "done")
    assert runs == 2 and row["attempts"] == 1  # released without counting the attempt, then run again
    assert not [r for r in caplog.records if r.exc_info]  # an outage: no traceback in the log


async def _true(value: bool) -> bool:
    return value


async def test_queue_unknown_kind_is_dead(catalog, run_queue):
    job_id = await _one_job(catalog, kind="mystery")
    await run_queue({"ingest": lambda job: None})
    row = await _job_in_state(catalog, job_id, "dead")
    assert "mystery" in row["last_error"]


async def test_queue_runs_followups(catalog, run_queue):
    [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("f1")])
    delivered = asyncio.Event()

    async def ingest(job: Job) -> JobResult:
        return JobResult(followups=[("deliver", f"deliver:{job.payload['event_id']}:bot",
                                     {"event_id": job.payload["event_id"]})],
                         event_update=(job.payload["event_id"], {"state": "stored"}))

    async def deliver(job: Job) -> None:
        assert job.payload == {"event_id": eid}
        delivered.set()

    q, _ = await run_queue({"ingest": ingest, "deliver": deliver})
    q.notify()
    await asyncio.wait_for(delivered.wait(), 5)

    async def all_done() -> bool:
        return await catalog.job_counts() == {("ingest", "done"): 1, ("deliver", "done"): 1}
    await _wait_for(all_done)
    assert (await catalog.get_event(eid))["state"] == "stored"


class CountingCatalog(Catalog):
    """The SQLite catalog, counting :meth:`claim_job` calls and the empty ones."""

    claims = 0
    empty = 0

    async def claim_job(self, *args: Any, **kwargs: Any) -> Any:
        row = await super().claim_job(*args, **kwargs)
        self.claims += 1
        self.empty += row is None
        return row


async def test_queue_claims_once_for_a_notified_job_and_a_handed_followup(tmp_path):
    catalog = CountingCatalog(tmp_path / "gateway.db")
    await catalog.open()
    [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("once")])
    delivered = asyncio.Event()

    async def ingest(job: Job) -> JobResult:
        return JobResult(followups=[("deliver", f"deliver:{eid}:bot", {"event_id": eid})])

    async def deliver(job: Job) -> None:
        delivered.set()

    q = JobQueue(catalog, QueueSettings(**{**FAST, "poll_interval": 30.0, "fetch_workers": 4}), Metrics(),
                 {"ingest": ingest, "deliver": deliver})
    try:
        await q.start()  # each worker's first claim takes the job or finds nothing
        await asyncio.wait_for(delivered.wait(), 5)
        [row] = await catalog.list_jobs(kind="deliver")
        await _job_in_state(catalog, row["id"], "done")
        await asyncio.sleep(0.2)
        catalog.claims = catalog.empty = 0
        [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("twice")])
        delivered.clear()
        q.notify({"ingest"})
        await asyncio.wait_for(delivered.wait(), 5)
        await _wait_for(lambda: _all_done(catalog))
        await asyncio.sleep(0.2)
        # one claim, the ingest's: no worker woken to look for more, none after the handed delivery
        assert (catalog.claims, catalog.empty) == (1, 0)
    finally:
        await q.stop(grace=1.0)
        await catalog.close()


async def test_queue_takes_a_webhooks_jobs_from_its_commit_while_workers_are_idle(tmp_path):
    catalog = CountingCatalog(tmp_path / "gateway.db")
    await catalog.open()
    attempts: list[int] = []
    ran, release = asyncio.Event(), asyncio.Event()

    async def ingest(job: Job) -> None:
        attempts.append(job.attempts)
        ran.set()
        await release.wait()  # keeps its worker busy

    q = JobQueue(catalog, QueueSettings(**{**FAST, "poll_interval": 30.0, "fetch_workers": 2}), Metrics(),
                 {"ingest": ingest})
    try:
        await q.start()
        await asyncio.sleep(0.2)  # each worker's first look found nothing: both idle
        catalog.claims = 0
        handoff = q.reserve({"ingest": 1})
        assert handoff.kinds == {"ingest"}
        [eid], _, claimed = await catalog.record_webhook("waha", b"{}", [_event("straight")], claim=handoff.kinds)
        q.hand(handoff, claimed)
        await asyncio.wait_for(ran.wait(), 5)
        assert attempts == [1] and catalog.claims == 0  # run from the commit: no claim
        # one worker idle now: two jobs get none (queued, to be claimed in deadline order), one does
        assert q.reserve({"ingest": 2}).kinds == frozenset()
        one = q.reserve({"ingest": 1})
        assert one.kinds == {"ingest"}
        assert q.reserve({"ingest": 1}).kinds == frozenset()  # that worker is promised already
        q.hand(one, [])  # its commit failed: the worker is free again
        again = q.reserve({"deliver": 1, "ingest": 1})
        assert again.kinds == {"ingest"}  # no deliver lane here (no handler): that job is queued
        q.hand(again, [])
    finally:
        release.set()
        await q.stop(grace=1.0)
        await catalog.close()
    assert q.reserve({"ingest": 1}).kinds == frozenset()  # stopped: nothing is handed any more


async def test_stop_right_after_a_hand_lets_the_handed_job_run(tmp_path):
    # SIGTERM just after a webhook's 200: its job was handed (its download may be under way,
    # begun at the commit) but no worker had taken it yet. It runs to its end within the grace.
    catalog = Catalog(tmp_path / "gateway.db")
    await catalog.open()
    finished: list[str] = []

    async def ingest(job: Job) -> None:
        await asyncio.sleep(0.3)  # the download
        finished.append(job.payload["event_id"])

    q = JobQueue(catalog, QueueSettings(**{**FAST, "poll_interval": 30.0, "fetch_workers": 2}), Metrics(),
                 {"ingest": ingest})
    try:
        await q.start()
        await asyncio.sleep(0.2)  # both workers idle
        handoff = q.reserve({"ingest": 1})
        [eid], _, claimed = await catalog.record_webhook("waha", b"{}", [_event("late")], claim=handoff.kinds)
        q.hand(handoff, claimed)
        await q.stop(grace=5.0)  # no turn of the loop in between: the woken worker has not run yet
        assert finished == [eid]
        assert [(j["state"], j["attempts"]) for j in await catalog.list_jobs(kind="ingest")] == [("done", 1)]
    finally:
        await catalog.close()


async def test_stop_requeues_a_handed_job_still_waiting_when_the_grace_ends(tmp_path):
    catalog = Catalog(tmp_path / "gateway.db")
    await catalog.open()
    started = asyncio.Event()

    async def ingest(job: Job) -> None:
        started.set()
        await asyncio.sleep(30)  # longer than the grace

    q = JobQueue(catalog, QueueSettings(**{**FAST, "poll_interval": 30.0, "fetch_workers": 1}), Metrics(),
                 {"ingest": ingest})
    try:
        await q.start()
        await asyncio.sleep(0.2)
        handoff = q.reserve({"ingest": 1})
        _, _, claimed = await catalog.record_webhook("waha", b"{}", [_event("slow")], claim=handoff.kinds)
        q.hand(handoff, claimed)
        await asyncio.wait_for(started.wait(), 5)
        began = time.monotonic()
        await q.stop(grace=0.3)
        assert time.monotonic() - began < 2
        assert [j["state"] for j in await catalog.list_jobs(kind="ingest")] == ["queued"]  # for the next start
    finally:
        await catalog.close()


async def _all_done(catalog: Catalog) -> bool:
    return all(state == "done" for (_, state) in await catalog.job_counts())


async def test_queue_jobs_nobody_announced_still_run_on_every_worker(catalog, run_queue):
    for i in range(4):
        assert await catalog.enqueue("ingest", f"ingest:{i}", {"n": i})
    together = asyncio.Barrier(4)

    async def ingest(job: Job) -> None:
        await asyncio.wait_for(together.wait(), 5)  # passes only once 4 run at the same time

    await run_queue({"ingest": ingest}, fetch_workers=4, poll_interval=30.0)  # no notify: found at start
    await _wait_for(lambda: _all_done(catalog))


async def test_queue_hands_followups_to_its_own_workers_without_a_claim(catalog, run_queue):
    [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("handed")])
    claims_seen: list[int] = []
    delivered = asyncio.Event()

    async def ingest(job: Job) -> JobResult:
        return JobResult(followups=[("deliver", f"deliver:{eid}:bot", {"event_id": eid})])

    async def deliver(job: Job) -> None:
        claims_seen.append(job.attempts)
        delivered.set()

    def mark_inserts(db) -> None:  # the state each job is created in, as the catalog wrote it
        db.conn.execute("CREATE TABLE created (job INTEGER, state TEXT)")
        db.conn.execute("CREATE TRIGGER mark AFTER INSERT ON jobs BEGIN"
                        " INSERT INTO created VALUES (new.id, new.state); END")
    await catalog.write(mark_inserts)
    q, _ = await run_queue({"ingest": ingest, "deliver": deliver})
    q.notify({"ingest"})
    await asyncio.wait_for(delivered.wait(), 5)
    [row] = await catalog.list_jobs(kind="deliver")
    await _job_in_state(catalog, row["id"], "done")
    assert claims_seen == [1]
    created = await catalog.run(lambda db: db.conn.execute("SELECT job, state FROM created").fetchall())
    assert created == [(row["id"], "running")]  # created claimed by the ingest's completion: no claim of its own


async def test_queue_stop_returns_handed_followups_unstarted(catalog):
    [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("handed-stop")])
    blocker = await catalog.enqueue("deliver", "deliver:blocker", {"event_id": "ev_blocker"})
    assert blocker
    entered, release = asyncio.Event(), asyncio.Event()

    async def ingest(job: Job) -> JobResult:
        return JobResult(followups=[("deliver", f"deliver:{eid}:bot", {"event_id": eid})])

    async def deliver(job: Job) -> None:
        entered.set()
        await release.wait()  # the one deliver worker is busy: the handed job waits here

    q = JobQueue(catalog, QueueSettings(**{**FAST, "workers": 1}), Metrics(), {"ingest": ingest, "deliver": deliver})
    await q.start()
    await asyncio.wait_for(entered.wait(), 5)

    async def ingested() -> bool:
        return [j["state"] for j in await catalog.list_jobs(kind="ingest")] == ["done"]
    await _wait_for(ingested)
    [handed] = [j for j in await catalog.list_jobs(kind="deliver") if j["key"] != "deliver:blocker"]
    assert handed["state"] == "running"  # claimed with its parent's completion, not started
    await q.stop(grace=0.1)
    row = await catalog.get_job(handed["id"])
    assert (row["state"], row["attempts"]) == ("queued", 0)


async def test_queue_start_requeues_jobs_left_running(catalog, run_queue):
    job_id = await _one_job(catalog)
    await catalog.claim_job()  # a previous process died with it running
    done = asyncio.Event()

    async def handler(job: Job) -> None:
        done.set()

    await run_queue({"ingest": handler})
    await asyncio.wait_for(done.wait(), 5)
    row = await _job_in_state(catalog, job_id, "done")
    assert row["attempts"] == 2


async def test_queue_stop_returns_a_blocked_job_uncounted(catalog):
    job_id = await _one_job(catalog)
    entered = asyncio.Event()
    cancelled = False

    async def handler(job: Job) -> None:
        nonlocal cancelled
        entered.set()
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            cancelled = True
            raise

    q = JobQueue(catalog, QueueSettings(**FAST), Metrics(), {"ingest": handler})
    await q.start()
    await asyncio.wait_for(entered.wait(), 5)
    assert (await catalog.get_job(job_id))["state"] == "running"
    started = time.monotonic()
    await asyncio.wait_for(q.stop(grace=0.1), 5)
    assert time.monotonic() - started < 2.0
    assert cancelled
    row = await catalog.get_job(job_id)
    assert (row["state"], row["attempts"]) == ("queued", 0)
    # and a new queue picks it up
    done = asyncio.Event()

    async def ok(job: Job) -> None:
        assert job.attempts == 1
        done.set()

    q2 = JobQueue(catalog, QueueSettings(**FAST), Metrics(), {"ingest": ok})
    await q2.start()
    try:
        await asyncio.wait_for(done.wait(), 5)
        await _job_in_state(catalog, job_id, "done")
    finally:
        await q2.stop(grace=1.0)


async def test_queue_stop_lets_a_job_finish_within_the_grace(catalog):
    job_id = await _one_job(catalog)
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(job: Job) -> None:
        entered.set()
        await release.wait()

    q = JobQueue(catalog, QueueSettings(**FAST), Metrics(), {"ingest": handler})
    await q.start()
    await asyncio.wait_for(entered.wait(), 5)
    stopping = asyncio.create_task(q.stop(grace=5.0))
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(stopping, 5)
    row = await catalog.get_job(job_id)
    assert (row["state"], row["attempts"]) == ("done", 1)


async def test_queue_stop_takes_no_new_jobs(catalog):
    q = JobQueue(catalog, QueueSettings(**FAST), Metrics(), {"ingest": lambda job: None})
    await q.start()
    await q.stop(grace=0.1)
    job_id = await _one_job(catalog)
    q.notify()
    await asyncio.sleep(0.1)  # nothing to wait for: the workers are gone
    assert (await catalog.get_job(job_id))["state"] == "queued"


# -- ids ------------------------------------------------------------------------------------------

def test_event_ids_are_unique_and_time_ordered():
    from gateway.catalog.rows import RandomPool, new_event_id

    first = [new_event_id() for _ in range(3000)]  # more than one pool's worth of random bytes
    assert len(set(first)) == len(first)
    assert all(len(i) == 35 and i.startswith("ev_") and int(i[3:], 16) >= 0 for i in first)
    time.sleep(0.002)
    later = new_event_id()
    assert later > max(first)  # the millisecond prefix orders ids made apart
    pool = RandomPool(size=16)
    drawn = [pool.hex(10) for _ in range(50)]  # refills whenever less than 10 bytes are left
    assert len(set(drawn)) == 50 and all(len(h) == 20 for h in drawn)
    assert len(pool.hex(40)) == 80  # more than the pool size at once


async def test_jobs_of_a_kind_no_lane_runs_go_dead_at_start_then_at_each_sweep(catalog, run_queue):
    async def handler(job: Job) -> None:
        pass

    first = await _one_job(catalog, "transcode")  # left by a gateway version that had such a lane
    q, metrics = await run_queue({"ingest": handler, "deliver": handler})

    async def dead(job_id: int) -> bool:
        row = await catalog.get_job(job_id)
        return row is not None and row["state"] == "dead"
    await _wait_for(lambda: dead(first))
    assert (await catalog.get_job(first))["last_error"] == "no handler for job kind 'transcode'"
    assert _processed(metrics, "transcode", "dead") == 1
    assert await catalog.enqueue("transcode", "transcode:2", {"n": 2})
    [second] = [j["id"] for j in await catalog.list_jobs(kind="transcode") if j["state"] == "queued"]
    await asyncio.sleep(0.3)  # six monitor rounds: the next sweep is a minute away
    assert (await catalog.get_job(second))["state"] == "queued"
    q.unknown_kinds_every = 0.1
    await _wait_for(lambda: dead(second))
