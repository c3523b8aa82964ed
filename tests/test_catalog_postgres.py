"""The PostgreSQL catalog as several replicas share it (DESIGN §6, scale-out): two catalog objects
on one database stand for two gateway processes. Job claims with ``FOR UPDATE SKIP LOCKED``, leases,
idempotency keys across replicas, the cleanup's advisory lock, ``LISTEN``/``NOTIFY`` and the
migrations, against a real PostgreSQL (tests/postgres.py). The behaviours both implementations
share are in test_catalog_contract.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from gateway.catalog import CatalogError
from gateway.catalog.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresCatalog
from gateway.catalog.postgres.jobs import claim_sql
from gateway.sdk.provider import WebhookEvent
from tests.postgres import PostgresServer

Replica = Callable[..., Awaitable[PostgresCatalog]]


@pytest.fixture
async def replica(postgres_server: PostgresServer) -> AsyncIterator[Replica]:
    """Opens a catalog on this test's database, as a replica of its own (``lease`` seconds)."""
    url = postgres_server.create_database()
    opened: list[PostgresCatalog] = []

    async def _open(lease: float = 30.0) -> PostgresCatalog:
        catalog = PostgresCatalog(url, lease=lease)
        await catalog.open()
        opened.append(catalog)
        return catalog

    yield _open
    for catalog in opened:
        await catalog.close()


def _event(key: str) -> WebhookEvent:
    return WebhookEvent(idempotency_key=key, event="message", account="default", payload={"id": key},
                        media=[], chat="1@c.us", message_id=key)


async def test_replicas_claim_disjoint_jobs(replica):
    a, b = await replica(), await replica()
    await a.record_webhook("waha", b"x", [_event(f"k{i}") for i in range(40)], now=1.0)

    async def drain(catalog: PostgresCatalog) -> list[int]:
        ids = []
        while (job := await catalog.claim_job(now=2.0)) is not None:
            ids.append(job["id"])
        return ids

    got = await asyncio.gather(drain(a), drain(b), drain(a), drain(b))
    claimed = [i for ids in got for i in ids]
    assert len(claimed) == 40 and len(set(claimed)) == 40  # every job once, none twice
    assert await a.count("jobs", "state = ? AND attempts = ?", ["running", 1]) == 40


def _rows_read(plan: dict, relation: str = "jobs") -> int:
    """The rows the scans of ``relation`` in an ``EXPLAIN (ANALYZE, FORMAT JSON)`` plan returned."""
    own = plan["Actual Rows"] * plan.get("Actual Loops", 1) if plan.get("Relation Name") == relation else 0
    return own + sum(_rows_read(child, relation) for child in plan.get("Plans", []))


async def test_a_claim_reads_its_lanes_first_job_not_the_backlog(replica):
    """Each claim took the lane's first job in index order, not every due job sorted: with the
    expired leases OR-ed into one condition and the kind as ``= ANY(array)`` it read all 2,000."""
    a, dead = await replica(), await replica(lease=10)
    await a.record_webhook("waha", b"x", [_event(f"k{i}") for i in range(2000)], now=1.0)
    await a.record_webhook("waha", b"x", [_event("other")], now=1.0, claim={"ingest"})  # running, a's lease
    await a.enqueue("deliver", "deliver:late", {"event_id": "e"})  # another lane's job, due
    await a.execute("ANALYZE jobs")
    first = await dead.claim_job(now=2.0, kinds=["ingest"])  # its replica dies: the lease ends at 12
    sql, params = claim_sql(["ingest"])
    with psycopg.connect(a.url) as conn:  # EXPLAIN ANALYZE runs the claim: rolled back
        plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql,
                            {"now": 3.0, "owner": a.owner, "until": 33.0, **params}).fetchone()[0][0]["Plan"]
        conn.rollback()
    assert _rows_read(plan) <= 5, plan  # the queued job taken, the row updated, no expired one yet
    second = await a.claim_job(now=3.0, kinds=["ingest"])
    assert second["id"] == first["id"] + 1  # the same deadline and run_at: the next id
    again = await a.claim_job(now=13.0, kinds=["ingest"])  # the expired lease comes before the queued jobs
    assert again["id"] == first["id"] and again["attempts"] == 2
    third = await a.claim_job(now=13.0, kinds=["ingest"])
    assert third["id"] == second["id"] + 1
    assert await a.claim_job(now=13.0, kinds=["deliver"]) is None  # enqueued now: not due at 13
    assert (await a.claim_job(kinds=["deliver"]))["key"] == "deliver:late"


async def test_an_idempotency_key_is_accepted_once_across_replicas(replica):
    a, b = await replica(), await replica()
    results = await asyncio.gather(*(c.record_webhook("waha", b"x", [_event("same")]) for c in (a, b) * 5))
    assert sum(len(accepted) for accepted, _, _ in results) == 1
    assert sum(len(dups) for _, dups, _ in results) == 9
    assert await b.count("events") == 1 and await b.count("jobs") == 1


async def test_a_dead_replicas_job_is_claimed_again_after_its_lease(replica):
    a, b = await replica(lease=10), await replica(lease=10)
    await a.record_webhook("waha", b"x", [_event("k")], now=100.0)
    job = await a.claim_job(now=100.0)  # a's lease runs to 110
    assert await b.claim_job(now=109.0) is None  # a is alive as far as anyone knows
    again = await b.claim_job(now=111.0)
    assert again is not None and again["id"] == job["id"] and again["attempts"] == 2
    assert await a.renew_leases([job["id"]]) == 0  # a lost it: it is b's now
    assert await b.renew_leases([job["id"]]) == 1


async def test_renewed_leases_keep_a_live_replicas_jobs(replica):
    a, b = await replica(lease=30), await replica(lease=30)
    await a.record_webhook("waha", b"x", [_event("k")])
    job = await a.claim_job()
    assert await b.requeue_running() == 0  # a starting replica leaves a live one's jobs alone
    assert await b.claim_job(now=time.time() + 29) is None
    await asyncio.sleep(0.05)
    assert await a.renew_leases([job["id"]]) == 1  # the lease now runs from later on
    row = (await a.fetch("SELECT lease_until, owner FROM jobs WHERE id = %s", (job["id"],)))[0]
    assert row["owner"] == a.owner and row["lease_until"] > time.time() + 29
    await a.complete_job(job["id"])
    assert await b.claim_job(now=time.time() + 1000) is None  # a done job is nobody's


async def test_the_cleanup_lock_is_held_by_one_replica_at_a_time(replica):
    a, b = await replica(), await replica()
    async with a.try_cleanup_lock() as held_a:
        assert held_a
        async with b.try_cleanup_lock() as held_b:
            assert not held_b
    async with b.try_cleanup_lock() as held_b:
        assert held_b


async def test_notices_cross_replicas(replica):
    a, b = await replica(), await replica()
    async with b.subscribe("gateway_media") as notices:
        await a.publish("gateway_media", {"type": "created", "record": {"id": "m_1", "size": 3}})
        assert await asyncio.wait_for(anext(notices), 5) == {"type": "created", "record": {"id": "m_1", "size": 3}}


async def test_migrations_are_numbered_and_a_newer_schema_is_refused(replica, postgres_server):
    a = await replica()
    assert await a.schema_version() == SCHEMA_VERSION
    await a.close()
    b = await replica()  # opening again migrates nothing
    assert await b.schema_version() == SCHEMA_VERSION
    await b.execute("UPDATE gateway_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(CatalogError, match="schema version"):
        await replica()


async def test_a_schema_2_catalog_gets_the_lane_index_by_id_and_keeps_its_jobs(postgres_server):
    url = postgres_server.create_database()
    with psycopg.connect(url, autocommit=True) as conn:  # what a gateway of schema 2 made
        conn.execute("CREATE TABLE gateway_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO gateway_schema VALUES (2)")
        for sql in MIGRATIONS[:2]:
            conn.execute(sql)
        conn.execute("INSERT INTO jobs (kind, key, payload, state, run_at, created_at, updated_at, deadline)"
                     " VALUES ('ingest', 'ingest:e1', '{\"event_id\": \"e1\"}', 'queued', 1, 1, 1, 200)")
    catalog = PostgresCatalog(url)
    await catalog.open()
    try:
        assert await catalog.schema_version() == SCHEMA_VERSION >= 3
        indexes = {r["indexname"]: r["indexdef"] for r in await catalog.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'jobs'")}
        assert "jobs_state_run_at" not in indexes and "jobs_lane_by_id" not in indexes
        assert indexes["jobs_lane"].endswith("(state, kind, deadline NULLS FIRST, run_at, id)"), indexes
        job = await catalog.claim_job(now=2.0, kinds=["ingest"])
        assert job is not None and job["key"] == "ingest:e1"
    finally:
        await catalog.close()


async def test_an_unreachable_database_is_a_catalog_error():
    with socket_port() as port:
        catalog = PostgresCatalog(f"postgresql://postgres@127.0.0.1:{port}/nothing")
        with pytest.raises(CatalogError, match="cannot open catalog"):
            await catalog.open()
    with pytest.raises(CatalogError, match="not open"):
        await catalog.check()


def socket_port():
    """A port with nothing listening on it, for the block."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def _port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]
    return _port()


async def test_host_conditions_are_translated(replica):
    a = await replica()
    for n, (name, mime) in enumerate([("Holiday.JPG", "image/jpeg"), ("notes.txt", "text/plain")]):
        await a.insert_media({"id": f"m_{n}", "sha256": "0" * 64, "size": 10 + n, "mimetype": mime,
                              "category": "image", "filename": name, "backend": "local", "key": f"k/{n}",
                              "source_key": f"s{n}", "created_at": 100.0 + n})
    rows = await a.list_media(["instr(lower(filename), ?) > 0", "substr(mimetype, 1, ?) = ?"],
                              ["holiday", 6, "image/"], "created_at", False, None, 10)
    assert [r["id"] for r in rows] == ["m_0"]
    assert await a.count("media", "filename LIKE ?", ["%.txt"]) == 1
    with pytest.raises(psycopg.Error):
        await a.count("media", "no_such_column = ?", [1])


async def test_a_replica_that_lost_its_lease_cannot_requeue_the_job(replica):
    a, b = await replica(lease=10), await replica(lease=10)
    await a.record_webhook("waha", b"x", [_event("k")], now=100.0)
    job = await a.claim_job(now=100.0)
    taken = await b.claim_job(now=200.0)  # a stalled past its lease; b runs the job now
    await a.fail_job(job["id"], "late failure", retry_at=300.0)
    await a.release_job(job["id"])
    row = await b.get_job(job["id"])
    assert (row["state"], row["attempts"], row["last_error"]) == ("running", taken["attempts"], None)
    await b.fail_job(job["id"], "boom", retry_at=None)
    assert (await b.get_job(job["id"]))["state"] == "dead"


async def test_a_worker_renews_the_lease_of_a_job_that_runs_longer_than_it(replica):
    from gateway.config import QueueSettings
    from gateway.jobs import JobQueue
    from gateway.metrics import Metrics

    a, b = await replica(lease=1.0), await replica(lease=1.0)
    ran = []

    async def slow(job):
        ran.append(job.id)
        await asyncio.sleep(2.5)  # 2.5 leases

    queue = JobQueue(a, QueueSettings(workers=1, lease=1.0, poll_interval=0.05), Metrics(), {"ingest": slow})
    await a.record_webhook("waha", b"x", [_event("slow")])
    await queue.start()
    try:
        deadline = time.monotonic() + 5
        while not ran:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        while (await a.get_job(ran[0]))["state"] == "running":
            assert await b.claim_job() is None  # a is alive and renews: nobody else runs the job
            await asyncio.sleep(0.1)
    finally:
        await queue.stop(grace=1)
    assert ran == [ran[0]]
    row = await b.get_job(ran[0])
    assert (row["state"], row["attempts"]) == ("done", 1)


async def test_a_read_only_catalog_reads_and_refuses_writes(postgres_server: PostgresServer):
    # a serving worker's catalog: no migration, only this gateway's schema, every session read-only
    url = postgres_server.create_database()
    with pytest.raises(CatalogError, match="only the daemon migrates it"):
        await PostgresCatalog(url, read_only=True).open()  # an empty database: nothing migrated
    writer = PostgresCatalog(url)
    await writer.open()
    reader = PostgresCatalog(url, read_only=True, pool_size=2)
    await reader.open()
    try:
        assert await reader.get_media("m_none") is None
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await reader.execute("DELETE FROM media")
    finally:
        await reader.close()
        await writer.close()
