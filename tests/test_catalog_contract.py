"""The catalog contract (:class:`gateway.catalog.CatalogContract`): its behaviours, through the
contract's methods only, for every implementation in :data:`IMPLEMENTATIONS` (SQLite and PostgreSQL;
another implementation adds itself there and passes the same tests). Real databases, nothing mocked.
Implementation-specific checks (SQLite's WAL mode, migrations) stay in ``test_catalog_jobs.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.catalog import CatalogContract, ExpiryRule, MediaRow, MediaTaken, ReadyEvent, SQLiteCatalog
from gateway.catalog.postgres import PostgresCatalog
from gateway.config import RetentionSettings
from gateway.media import CATEGORIES
from gateway.sdk.provider import MediaRef, WebhookEvent
from gateway.retention import DAY, expiry_rule, max_age_seconds

T0 = 1_000_000.0  # an injected clock for the catalog's own ``now`` parameters

IMPLEMENTATIONS: dict[str, Callable[[Path, pytest.FixtureRequest], CatalogContract]] = {
    "sqlite": lambda tmp_path, request: SQLiteCatalog(tmp_path / "var" / "gateway.db"),
    "postgres": lambda tmp_path, request: PostgresCatalog(_test_database(tmp_path, request)),
}
"""How to make a catalog on this test's fresh store (``tmp_path``; PostgreSQL: a database of its
own on the session's server); every instance made for one test shares it."""

_DATABASES: dict[Path, str] = {}


def _test_database(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of this test's own database, created on first use."""
    if tmp_path not in _DATABASES:
        _DATABASES[tmp_path] = request.getfixturevalue("postgres_server").create_database()
    return _DATABASES[tmp_path]

OpenCatalog = Callable[[], Awaitable[CatalogContract]]


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def open_catalog(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenCatalog]:
    """Opens a catalog on this test's store (a second call: another process's view of the same store,
    as after a restart); all are closed at the end."""
    opened: list[CatalogContract] = []

    async def _open() -> CatalogContract:
        catalog = IMPLEMENTATIONS[request.param](tmp_path, request)
        await catalog.open()
        opened.append(catalog)
        return catalog

    yield _open
    for catalog in opened:
        await catalog.close()


@pytest.fixture
async def catalog(open_catalog: OpenCatalog) -> CatalogContract:
    return await open_catalog()


def _event(key: str, media: int = 1) -> WebhookEvent:
    return WebhookEvent(
        idempotency_key=key, event="message", account="default",
        payload={"id": key, "body": "hi"},
        media=[MediaRef(path="payload.media", url=f"http://waha/files/{key}-{i}", source_key=f"src:{key}:{i}",
                        mimetype="image/jpeg") for i in range(media)],
        chat="123@c.us", message_id=key,
    )


def _media(n: int, **values: Any) -> MediaRow:
    """Media row ``n`` (created at ``T0 + n``, ``n`` * 100 bytes) with ``values`` changed."""
    media_id = f"m_{n:027x}"
    row: dict[str, Any] = {
        "id": media_id, "sha256": "0" * 64, "size": 100 * n, "mimetype": "image/jpeg", "category": "image",
        "filename": f"{n}.jpg", "backend": "local", "key": f"k/{media_id}", "provider": "waha",
        "source_key": f"src:{n}", "created_at": T0 + n, **values}
    return cast(MediaRow, row)


def _rule(**values: Any) -> ExpiryRule:
    """Everything on ``local`` older than 10 s at ``T0 + 1000`` expires."""
    return ExpiryRule(**{"backend": "local", "now": T0 + 1000, "before": T0 + 1000, "default_age": 10.0, **values})


# -- events ---------------------------------------------------------------------------------------

async def test_record_webhook_reports_duplicates(catalog):
    first, _, _ = await catalog.record_webhook("waha", b"1", [_event("k1")], now=T0)
    accepted, dups, _ = await catalog.record_webhook("waha", b"2", [_event("k1"), _event("k3")], now=T0 + 1)
    assert dups == ["k1"] and len(accepted) == 1
    assert await catalog.count("events") == 2
    assert await catalog.count("jobs") == 2
    # the first copy is untouched
    assert (await catalog.get_event(first[0]))["raw"] == b"1"
    # a repeat inside one body is a duplicate too
    accepted, dups, _ = await catalog.record_webhook("waha", b"3", [_event("k4"), _event("k4")], now=T0)
    assert len(accepted) == 1 and dups == ["k4"]


async def test_events_per_minute(catalog):
    start = 60 * 16_000  # a minute boundary
    for n, at in enumerate([start - 1, start, start + 59.9, start + 60, start + 185]):
        await catalog.record_webhook("waha", b"x", [_event(f"epm{n}")], now=at)
    assert await catalog.events_per_minute(start) == [(start, 2), (start + 60, 1), (start + 180, 1)]
    assert await catalog.events_per_minute(start + 200) == []


async def test_concurrent_redeliveries_store_one_event(catalog):
    results = await asyncio.gather(*(catalog.record_webhook("waha", b"x", [_event("same")], now=T0)
                                     for _ in range(10)))
    assert sum(len(a) for a, _, _ in results) == 1
    assert sum(len(d) for _, d, _ in results) == 9
    assert await catalog.count("events") == 1 and await catalog.count("jobs") == 1


async def test_a_ready_event_is_recorded_ingested_with_its_followups_and_no_ingest_job(catalog):
    ids = ["ev_" + "a" * 32, "ev_" + "b" * 32, "ev_" + "c" * 32]
    events = [_event("with-media"), _event("text", media=0), _event("old-text", media=0)]
    await catalog.record_webhook("waha", b"0", [events[2]], now=T0, event_ids=["ev_" + "0" * 32])
    forward = {"event": "message", "payload": {"body": "hi"}, "gateway": {"event_id": ids[1], "notes": []}}
    ready = {1: ReadyEvent(forward, [("deliver", f"deliver:{ids[1]}:bot", {"event_id": ids[1], "target": "bot"})]),
             2: ReadyEvent(forward, [("deliver", f"deliver:{ids[2]}:bot", {"event_id": ids[2], "target": "bot"})])}
    accepted, dups, _ = await catalog.record_webhook("waha", b"1", events, now=T0 + 1, event_ids=ids, ready=ready)
    assert accepted == ids[:2] and dups == ["old-text"]  # a duplicate gets nothing, ready or not
    text = await catalog.get_event(ids[1])
    assert text["state"] == "ingested" and text["forward"] == forward
    assert (await catalog.get_event(ids[0]))["state"] == "queued"
    jobs = {(j["kind"], j["payload"]["event_id"]) for j in await catalog.list_jobs(state="queued")}
    assert jobs == {("ingest", ids[0]), ("ingest", "ev_" + "0" * 32), ("deliver", ids[1])}


async def test_complete_job_can_claim_its_followups(catalog):
    [eid], _, _ = await catalog.record_webhook("waha", b"a", [_event("claim-followups")], now=T0)
    await catalog.enqueue("deliver", f"deliver:{eid}:old", {"event_id": eid})  # exists: left alone
    parent = await catalog.claim_job(kinds=["ingest"])
    followups = [("deliver", f"deliver:{eid}:{t}", {"event_id": eid, "target": t}) for t in ("a", "old")]
    claimed = await catalog.complete_job(parent["id"], followups, claim=True)
    assert [(c["key"], c["attempts"], c["payload"]) for c in claimed] == [
        (f"deliver:{eid}:a", 1, {"event_id": eid, "target": "a"})]
    assert (await catalog.get_job(claimed[0]["id"]))["state"] == "running"
    assert (await catalog.get_job(parent["id"]))["state"] == "done"
    # not handed to a claim; the existing one is still queued; released, it is queued with no attempt
    assert (await catalog.claim_job(kinds=["deliver"]))["key"] == f"deliver:{eid}:old"
    assert await catalog.claim_job(kinds=["deliver"]) is None
    await catalog.release_job(claimed[0]["id"])
    row = await catalog.get_job(claimed[0]["id"])
    assert (row["state"], row["attempts"]) == ("queued", 0)
    assert await catalog.complete_job(claimed[0]["id"], followups) == []  # without claim: nothing claimed


async def test_record_webhook_can_claim_the_jobs_it_adds(catalog):
    ids = ["ev_" + "d" * 32, "ev_" + "e" * 32]
    forward = {"event": "message", "payload": {"body": "hi"}, "gateway": {"event_id": ids[1], "notes": []}}
    ready = {1: ReadyEvent(forward, [("deliver", f"deliver:{ids[1]}:bot", {"event_id": ids[1], "target": "bot"})])}
    accepted, dups, claimed = await catalog.record_webhook(
        "waha", b"c", [_event("claimed"), _event("text", media=0)], now=T0, event_ids=ids, ready=ready,
        claim={"ingest"})
    assert accepted == ids and dups == []
    [job] = claimed  # the ingest job, claimed; the delivery (a kind not named) is queued
    assert (job["kind"], job["key"], job["attempts"], job["payload"]) == (
        "ingest", f"ingest:{ids[0]}", 1, {"event_id": ids[0]})
    deadline = T0 + catalog.media_lifetime("waha")
    row = await catalog.get_job(job["id"])
    assert (row["state"], row["deadline"]) == ("running", deadline)
    assert await catalog.media_backlog() is None  # claimed: no media waits
    assert (await catalog.claim_job(now=T0))["key"] == f"deliver:{ids[1]}:bot"
    assert await catalog.claim_job(now=T0) is None
    _, dups, claimed = await catalog.record_webhook("waha", b"c", [_event("claimed")], now=T0 + 1,
                                                    claim={"ingest", "deliver"})
    assert dups == ["claimed"] and claimed == []  # a duplicate adds no job, claimed or not
    await catalog.release_job(job["id"])  # back in the queue, its deadline kept
    assert await catalog.media_backlog() == (T0, deadline)


async def test_writes_that_need_not_wait_for_the_disk_commit_all_the_same(catalog):
    # SQLite commits them without an fsync, PostgreSQL with synchronous_commit off: the same rows
    [eid], _, [job] = await catalog.record_webhook("waha", b"n", [_event("not-durable")], now=T0, claim={"ingest"})
    await catalog.complete_job(job["id"], durable=False, media=[_media(7)])
    assert (await catalog.get_job(job["id"]))["state"] == "done"
    assert (await catalog.get_media(_media(7)["id"]))["source_key"] == "src:7"


async def test_a_completion_inserts_its_media_rows_or_nothing_when_a_copy_holds_their_source_key(catalog):
    ids, _, jobs = await catalog.record_webhook("waha", b"m", [_event("a"), _event("b"), _event("c")], now=T0,
                                                claim={"ingest"})
    a, b, c = (job["id"] for job in jobs)
    forward = {"forward": {"payload": {}}, "state": "ingested"}
    claimed = await catalog.complete_job(a, [("deliver", f"deliver:{ids[0]}:bot", {"event_id": ids[0]})],
                                         (ids[0], forward), claim=True, media=[_media(1), _media(2)])
    assert [j["key"] for j in claimed] == [f"deliver:{ids[0]}:bot"]
    assert {r["id"] for r in await catalog.list_media([], [], "created_at", False, None, 10)} == {
        _media(1)["id"], _media(2)["id"]}
    # another job of the same attachment links the same row: left as it is, the job done
    await catalog.complete_job(b, media=[_media(2)])
    assert (await catalog.get_job(b))["state"] == "done" and await catalog.count("media") == 2
    # a copy of another id holds src:1: nothing of the call is committed
    with pytest.raises(MediaTaken) as taken:
        await catalog.complete_job(c, [("deliver", f"deliver:{ids[2]}:bot", {"event_id": ids[2]})],
                                   (ids[2], forward), media=[_media(3), _media(4, source_key="src:1")])
    assert taken.value.source_keys == ["src:1"]
    job = await catalog.get_job(c)
    assert job is not None and job["state"] == "running"
    assert await catalog.get_media(_media(3)["id"]) is None and await catalog.get_media(_media(4)["id"]) is None
    assert (await catalog.get_event(ids[2]))["state"] != "ingested"
    assert await catalog.count("jobs", "kind = ?", ["deliver"]) == 1
    # the revised result links the stored copy: committed
    await catalog.complete_job(c, media=[_media(3)])
    assert (await catalog.get_job(c))["state"] == "done" and await catalog.count("media") == 3


async def test_get_event_unknown(catalog):
    assert await catalog.get_event("ev_nope") is None


async def test_claim_respects_run_at_and_order(catalog):
    a, _, _ = await catalog.record_webhook("waha", b"a", [_event("a")], now=T0)
    b, _, _ = await catalog.record_webhook("waha", b"b", [_event("b")], now=T0 + 5)
    assert await catalog.next_run_at() == T0
    assert await catalog.claim_job(now=T0 - 1) is None
    job = await catalog.claim_job(now=T0 + 10)
    assert job["payload"] == {"event_id": a[0]} and job["attempts"] == 1 and job["kind"] == "ingest"
    assert (await catalog.get_job(job["id"]))["state"] == "running"
    job2 = await catalog.claim_job(now=T0 + 10)
    assert job2["payload"] == {"event_id": b[0]}
    assert await catalog.claim_job(now=T0 + 10) is None
    assert await catalog.next_run_at() is None


async def test_list_jobs_pages_in_the_catalog_by_id(catalog):
    for i in range(7):
        assert await catalog.enqueue("deliver" if i % 2 else "ingest", f"k{i}", {"i": i})
    await catalog.complete_job((await catalog.claim_job(now=time.time() + 60, kinds=["ingest"]))["id"])
    everything = await catalog.list_jobs()
    ids = [j["id"] for j in everything]
    assert ids == sorted(ids) and [j["payload"]["i"] for j in everything] == list(range(7))
    assert [j["id"] for j in await catalog.list_jobs(newest_first=True)] == ids[::-1]
    assert [j["id"] for j in await catalog.list_jobs(limit=2)] == ids[:2]
    assert [j["id"] for j in await catalog.list_jobs(newest_first=True, limit=3, before=ids[5])] == \
        [ids[4], ids[3], ids[2]]
    assert [j["payload"]["i"] for j in await catalog.list_jobs(kind="deliver", newest_first=True, limit=2)] == [5, 3]
    assert [j["payload"]["i"] for j in await catalog.list_jobs(state="queued", kind="ingest")] == [2, 4, 6]
    assert [j["state"] for j in await catalog.list_jobs(state="done", before=ids[-1])] == ["done"]
    assert await catalog.list_jobs(state="", kind="", limit=100) == everything  # empty filters: none
    assert await catalog.list_jobs(before=ids[0]) == [] and await catalog.list_jobs(limit=0) == []
    pages, before = [], None  # newest first, a page at a time, as the API and the console read it
    while page := await catalog.list_jobs(newest_first=True, limit=3, before=before):
        pages.append([j["id"] for j in page])
        before = page[-1]["id"]
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[:1]]


async def test_complete_job_with_followups_and_event_update(catalog):
    [eid], _, _ = await catalog.record_webhook("waha", b"a", [_event("a")], now=T0)
    job = await catalog.claim_job(now=T0)
    followups = [("deliver", f"deliver:{eid}:bot", {"event_id": eid, "target": "bot"}),
                 ("deliver", f"deliver:{eid}:bot2", {"event_id": eid, "target": "bot2"})]
    await catalog.complete_job(job["id"], followups, (eid, {"state": "stored", "forward": {"x": [1]},
                                                            "notes": ["n1"]}))
    done = await catalog.get_job(job["id"])
    assert done["state"] == "done" and done["last_error"] is None and done["attempts"] == 1
    ev = await catalog.get_event(eid)
    assert ev["state"] == "stored" and ev["forward"] == {"x": [1]} and ev["notes"] == ["n1"]
    deliver = await catalog.list_jobs(state="queued", kind="deliver")
    assert [j["payload"]["target"] for j in deliver] == ["bot", "bot2"]
    assert all(j["attempts"] == 0 for j in deliver)
    # follow-ups are idempotent by key
    assert await catalog.enqueue("deliver", f"deliver:{eid}:bot", {"dup": True}) is False
    assert await catalog.count("jobs", "kind = ?", ["deliver"]) == 2
    assert await catalog.job_counts() == {("ingest", "done"): 1, ("deliver", "queued"): 2}


async def test_fail_job_retry_then_dead(catalog):
    await catalog.record_webhook("waha", b"a", [_event("a")], now=T0)
    job = await catalog.claim_job(now=T0)
    await catalog.fail_job(job["id"], "ConnectionError: refused", retry_at=T0 + 30)
    row = await catalog.get_job(job["id"])
    assert (row["state"], row["run_at"], row["last_error"], row["attempts"]) == (
        "queued", T0 + 30, "ConnectionError: refused", 1)
    assert await catalog.claim_job(now=T0 + 29) is None
    again = await catalog.claim_job(now=T0 + 30)
    assert again["id"] == job["id"] and again["attempts"] == 2

    await catalog.fail_job(job["id"], "x" * 5000, retry_at=None)
    row = await catalog.get_job(job["id"])
    assert row["state"] == "dead" and row["last_error"] == "x" * 2000  # bounded
    assert await catalog.claim_job(now=T0 + 10**9) is None


async def test_release_job_uncounts_the_attempt(catalog):
    await catalog.record_webhook("waha", b"a", [_event("a")], now=T0)
    job = await catalog.claim_job(now=T0)
    await catalog.release_job(job["id"])
    row = await catalog.get_job(job["id"])
    assert (row["state"], row["attempts"]) == ("queued", 0)
    await catalog.release_job(job["id"])  # only a running job is released
    assert (await catalog.get_job(job["id"]))["attempts"] == 0


async def test_requeue_running_after_a_crash(open_catalog):
    c = await open_catalog()
    await c.record_webhook("waha", b"a", [_event("a"), _event("b")], now=T0)
    claimed = await c.claim_job(now=T0)
    await c.close()  # "crash": the job is never finished

    c2 = await open_catalog()  # the next daemon on the same store
    try:
        assert (await c2.get_job(claimed["id"]))["state"] == "running"
        other = await c2.claim_job(now=T0)
        assert other["id"] != claimed["id"]
        assert await c2.claim_job(now=T0) is None  # the running one is not handed out twice
        await c2.release_job(other["id"])
        assert await c2.requeue_running() == 1
        assert (await c2.get_job(claimed["id"]))["state"] == "queued"
        assert await c2.requeue_running() == 0
        jobs = [await c2.claim_job(now=T0), await c2.claim_job(now=T0)]
        assert {j["id"] for j in jobs} == {claimed["id"], other["id"]}
        again = next(j for j in jobs if j["id"] == claimed["id"])
        assert again["attempts"] == 2  # the crashed attempt counts (a poison job cannot loop forever)
    finally:
        await c2.close()


async def test_a_closed_catalog_raises_catalog_error(open_catalog):
    from gateway.catalog import CatalogError
    catalog = await open_catalog()
    await catalog.check()
    await catalog.close()
    with pytest.raises(CatalogError):
        await catalog.check()
    await catalog.close()  # idempotent


# -- media ----------------------------------------------------------------------------------------

async def test_insert_media_is_idempotent_by_source_key(catalog):
    row, inserted = await catalog.insert_media(_media(1))
    assert inserted and row["id"] == _media(1)["id"]
    stored = await catalog.get_media(row["id"])
    assert stored is not None
    assert (stored["state"], stored["direction"], stored["is_public"], stored["size"]) == ("stored", "inbound", 0, 100)
    # a concurrent ingest stored the same attachment: the first row is the answer, no second row
    again, inserted = await catalog.insert_media(_media(2, source_key="src:1"))
    assert not inserted and again["id"] == row["id"]
    assert await catalog.count("media") == 1
    assert (await catalog.media_by_source("src:1"))["id"] == row["id"]
    assert await catalog.media_by_source("src:nope") is None
    assert await catalog.get_media("m_nope") is None


async def test_a_row_being_deleted_no_longer_counts_for_its_source_key(catalog):
    await catalog.insert_media(_media(1))
    claimed = await catalog.claim_media_for_delete(_media(1)["id"], T0)
    assert claimed is not None and claimed["state"] == "deleting" and claimed["state_reason"] == "api"
    assert await catalog.claim_media_for_delete(_media(1)["id"], T0) is None  # another deletion has it
    assert await catalog.claim_media_for_delete("m_nope", T0) is None
    assert await catalog.media_by_source("src:1") is None  # the attachment is fetched again
    _, inserted = await catalog.insert_media(_media(2, source_key="src:1"))
    assert inserted and (await catalog.media_by_source("src:1"))["id"] == _media(2)["id"]


async def test_update_media_sets_columns_of_an_existing_row(catalog):
    await catalog.insert_media(_media(1))
    assert await catalog.update_media(_media(1)["id"], {"chat": "c@c.us", "is_public": True})
    row = await catalog.get_media(_media(1)["id"])
    assert (row["chat"], row["is_public"]) == ("c@c.us", 1)
    assert await catalog.update_media("m_nope", {"chat": "x"}) is False


async def test_list_media_filters_sorts_and_pages_by_keyset(catalog):
    sizes = {1: 500, 2: 100, 3: 300, 4: 300, 5: 200}
    for n, size in sizes.items():
        await catalog.insert_media(_media(n, size=size, provider="meta" if n % 2 else "waha",
                                          tenant="t1" if n < 4 else None))
    ids = {n: _media(n)["id"] for n in sizes}
    rows = await catalog.list_media(["provider = ?"], ["meta"], "created_at", False, None, 10)
    assert [r["id"] for r in rows] == [ids[1], ids[3], ids[5]]
    assert await catalog.count("media", "provider = ?", ["waha"]) == 2
    # pages of two by size, largest first, ties by id: the keyset of the last row starts the next page
    pages, after = [], None
    while page := await catalog.list_media([], [], "size", True, after, 2):
        pages.append([r["id"] for r in page])
        after = (page[-1]["size"], page[-1]["id"])
    assert pages == [[ids[1], ids[4]], [ids[3], ids[5]], [ids[2]]]
    with pytest.raises(ValueError):
        await catalog.list_media([], [], "filename", False, None, 1)
    with pytest.raises(ValueError):
        await catalog.count("cleanup_runs")


async def test_media_stats_and_totals_group_what_is_stored(catalog):
    await catalog.insert_media(_media(1, tenant="t1"))
    await catalog.insert_media(_media(2, category="video", provider="meta"))
    await catalog.insert_media(_media(3, tenant="t1"))
    await catalog.claim_media_for_delete(_media(3)["id"], T0)  # being deleted: not counted by media_stats
    assert await catalog.media_stats(None) == {
        "category": [("image", 1, 100), ("video", 1, 200)],
        "provider": [("meta", 1, 200), ("waha", 1, 100)],
        "backend": [("local", 2, 300)]}
    assert (await catalog.media_stats("t1"))["category"] == [("image", 1, 100)]
    assert sorted(await catalog.media_totals()) == [("local", "meta", "video", 1, 200),
                                                    ("local", "waha", "image", 2, 400)]


# -- retention queries ----------------------------------------------------------------------------

async def test_claim_by_lane_and_the_media_backlog(catalog):
    a, _, _ = await catalog.record_webhook("waha", b"a", [_event("a")], now=T0)
    b, _, _ = await catalog.record_webhook("waha", b"b", [_event("b")], now=T0 + 5)
    assert await catalog.enqueue("deliver", "deliver:x", {"event_id": "x"})
    assert await catalog.enqueue("mystery", "mystery:1", {})
    deadline = (await catalog.media_backlog())[1] - T0  # the provider's media lifetime (WAHA: 180 s)
    assert await catalog.media_backlog() == (T0, T0 + deadline) and deadline > 0
    assert await catalog.media_waiting() == 2  # the ingest jobs only
    now = time.time() + 1
    assert await catalog.next_run_at(["ingest"]) == T0
    assert await catalog.next_run_at(["deliver"]) > T0
    assert (await catalog.claim_job(now=now, kinds=["deliver"]))["key"] == "deliver:x"
    assert (await catalog.claim_job(now=now, exclude_kinds=["ingest", "deliver"]))["key"] == "mystery:1"
    assert await catalog.claim_job(now=now, exclude_kinds=["ingest"]) is None
    assert (await catalog.claim_job(now=now, kinds=["ingest"]))["payload"] == {"event_id": a[0]}
    assert await catalog.media_backlog() == (T0 + 5, T0 + 5 + deadline)
    assert await catalog.media_waiting() == 2  # one queued, one running
    assert (await catalog.claim_job(now=now, kinds=["ingest"]))["payload"] == {"event_id": b[0]}
    assert await catalog.media_backlog() is None
    assert await catalog.media_waiting() == 2
    await catalog.complete_job((await catalog.list_jobs(kind="ingest"))[0]["id"])
    assert await catalog.media_waiting() == 1


async def test_expired_media_keeps_what_a_queued_job_needs_and_claims_the_rest(catalog):
    [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("a")], now=T0)  # needs src:a:0
    await catalog.insert_media(_media(1, source_key="src:a:0"))
    await catalog.insert_media(_media(2))
    await catalog.insert_media(_media(3, created_at=T0 + 995, expires_at=T0 + 1000))  # young, but expires now
    await catalog.insert_media(_media(4, created_at=T0 + 1000))  # created at the run's start: left alone
    await catalog.insert_media(_media(5, backend="s3"))  # another backend
    ids = [_media(n)["id"] for n in range(6)]
    rule = _rule()
    assert await catalog.count_expired_media(rule) == (3, 1, 200 + 300)
    rows = await catalog.expired_media(rule, "", 10, claim=True)
    assert [(r["id"], r["reason"], r["in_use"]) for r in rows] == [
        (ids[1], "age", True), (ids[2], "age", False), (ids[3], "expires_at", False)]
    assert [(await catalog.get_media(i))["state"] for i in ids[1:4]] == ["stored", "deleting", "deleting"]
    assert await catalog.expired_media(rule, ids[3], 10, claim=False) == []
    being_deleted = await catalog.media_being_deleted("local", "", 10)
    assert [(r["id"], r["reason"], r["size"]) for r in being_deleted] == [(ids[2], "age", 200),
                                                                          (ids[3], "expires_at", 300)]
    assert await catalog.media_being_deleted("local", ids[2], 10) == being_deleted[1:]
    assert await catalog.forget_media([ids[1], ids[2], ids[3]]) == 2  # only rows being deleted
    assert await catalog.get_media(ids[2]) is None and await catalog.get_media(ids[1]) is not None
    # once the event's job is done, nothing needs the object any more
    job = await catalog.claim_job(now=T0)
    await catalog.complete_job(job["id"], [], (eid, {"state": "stored"}))
    assert [(r["id"], r["in_use"]) for r in await catalog.expired_media(rule, "", 10, claim=False)] == [
        (ids[1], False)]


async def test_reconciliation_finds_orphans_and_rows_without_object(catalog):
    [eid], _, _ = await catalog.record_webhook("waha", b"{}", [_event("a")], now=T0)
    await catalog.insert_media(_media(1))
    await catalog.insert_media(_media(2, event_id=eid))
    await catalog.insert_media(_media(3, created_at=T0 + 500))  # created after the listing started
    ids = [_media(n)["id"] for n in range(4)]
    await catalog.begin_listing()
    await catalog.add_listing([("", f"k/{ids[1]}", 100, T0), ("", "foreign/x", 7, T0)])
    await catalog.add_listing([("", "orphan/y", 9, T0 + 1)])
    assert await catalog.listed_without_row("local", ("", ""), 10) == [("", "foreign/x", 7, T0),
                                                                      ("", "orphan/y", 9, T0 + 1)]
    assert await catalog.listed_without_row("local", ("", "foreign/x"), 10) == [("", "orphan/y", 9, T0 + 1)]
    unlisted = await catalog.rows_not_listed("local", T0 + 100, "", 10)
    assert [(r["id"], r["key"], r["size"], r["event_id"]) for r in unlisted] == [(ids[2], f"k/{ids[2]}", 200, eid)]
    assert await catalog.media_keys_present("local", [("", f"k/{ids[1]}"), ("", "orphan/y")]) == {
        ("", f"k/{ids[1]}")}
    assert await catalog.mark_missing([ids[2], ids[1] + "x"], T0) == 1
    missing = await catalog.get_media(ids[2])
    assert (missing["state"], missing["state_reason"]) == ("missing", "not in storage")
    assert await catalog.media_by_source("src:2") is None
    await catalog.end_listing()
    await catalog.end_listing()  # idempotent


async def test_pruning_deletes_finished_events_with_their_jobs(catalog):
    [done, waiting], _, _ = await catalog.record_webhook("waha", b"{}", [_event("a"), _event("b")], now=T0)
    job = await catalog.claim_job(now=T0)
    assert job["payload"] == {"event_id": done}
    await catalog.complete_job(job["id"], [], (done, {"state": "stored"}))
    assert await catalog.count_prunable(T0 + 1, None) == (1, 1)
    assert await catalog.count_prunable(None, None) == (0, 0)
    assert await catalog.count_prunable(T0, None) == (0, 0)  # received at T0: not before it
    assert await catalog.prune_events(T0 + 1, 10) == (1, 1)
    assert await catalog.get_event(done) is None and await catalog.get_event(waiting) is not None
    assert await catalog.prune_events(T0 + 1, 10) == (0, 0)
    assert await catalog.enqueue("deliver", "d1", {"n": 1})
    job = await catalog.claim_job()
    await catalog.complete_job(job["id"])
    assert await catalog.prune_done_jobs(time.time() - 60, 10) == 0
    assert await catalog.count_prunable(None, time.time() + 60) == (0, 1)
    assert await catalog.prune_done_jobs(time.time() + 60, 10) == 1
    assert await catalog.count("jobs") == 1  # the waiting event's ingest job


async def test_cleanup_runs_are_logged_newest_first_and_bounded(catalog):
    for n in range(3):
        await catalog.record_cleanup_run("cli", T0 + n, T0 + n + 0.5, ok=n < 2, report={"n": n}, keep=2)
    runs = await catalog.cleanup_runs()
    assert [(r["trigger"], r["ok"], r["report"], r["finished_at"]) for r in runs] == [
        ("cli", 0, {"n": 2}, T0 + 2.5), ("cli", 1, {"n": 1}, T0 + 1.5)]
    assert len(await catalog.cleanup_runs(limit=1)) == 1
    await catalog.insert_media(_media(1))
    await catalog.record_webhook("waha", b"{}", [_event("a")], now=T0)
    stats = await catalog.stats()
    assert stats.last_cleanup == T0 + 1.5  # the last successful run
    assert stats.jobs == {("ingest", "queued"): 1} and stats.oldest_queued == {"ingest": T0}
    assert stats.media == [("local", "image", "stored", 1, 100)]


async def test_the_sql_rule_is_the_documented_rule(open_catalog):
    """Every provider x category x age combination: the catalog's query picks exactly the rows
    :func:`max_age_seconds` says are too old (the rule the README documents)."""
    settings = RetentionSettings(max_age_days=30, keep_public=True,
                                 category_max_age_days={"video": 5, "document": "forever", "audio": 60},
                                 provider_max_age_days={"meta": 10, "waha": 45})
    catalog = await open_catalog()
    now = 1_800_000_000.0
    want, n = set(), 0
    try:
        for provider in ("waha", "meta", "other"):
            for category in CATEGORIES:
                for age in (1, 6, 11, 31, 46, 61, 1000):
                    n += 1
                    media_id = f"m_{n:027x}"
                    public = n % 11 == 0
                    await catalog.insert_media({
                        "id": media_id, "sha256": "0" * 64, "size": 1, "mimetype": "x/y", "category": category,
                        "filename": "f", "backend": "local", "key": f"k/{media_id}", "provider": provider,
                        "source_key": media_id, "created_at": now - age * DAY, "is_public": int(public)})
                    if age * DAY > max_age_seconds(settings, provider, category) and not public:
                        want.add(media_id)
        rule = expiry_rule(settings, "local", now, now)
        got = {r["id"] for r in await catalog.expired_media(rule, "", 10_000, claim=False)}
        assert got == want and 0 < len(want) < n
        assert (await catalog.count_expired_media(rule))[:2] == (len(want), 0)
    finally:
        await catalog.close()


# -- live notices and the cleanup lock ------------------------------------------------------------

async def test_published_notices_reach_the_subscribers_of_the_channel(catalog):
    async with catalog.subscribe("media") as notices, catalog.subscribe("other") as others:
        await catalog.publish("media", {"type": "created", "record": {"id": "m_1"}})
        await catalog.publish("media", {"type": "deleted", "record": {"id": "m_1"}})
        got = [await asyncio.wait_for(anext(notices), 5) for _ in range(2)]
        assert [n["type"] for n in got] == ["created", "deleted"] and got[0]["record"] == {"id": "m_1"}
        await catalog.publish("other", {"n": 1})
        assert await asyncio.wait_for(anext(others), 5) == {"n": 1}
    await catalog.publish("media", {"type": "late"})  # nobody listens: not an error


async def test_the_cleanup_lock_is_free_when_nobody_cleans(catalog):
    async with catalog.try_cleanup_lock() as held:
        assert held
    async with catalog.try_cleanup_lock() as held:  # released at the end of the block
        assert held
