"""Retention cleanup (gateway/retention/): what goes, what stays, on local storage and on S3
(SeaweedFS), with the policy's "now" injected through the cleaner's clock instead of waiting."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from gateway.app import create_app
from gateway.keys import CATALOG, METRICS, RETENTION, STORAGE
from gateway.config import ConfigError, Settings, load_settings
from gateway.media import new_media_id
from gateway.retention import CleanupBusy, CleanupItem, crontab_trigger, max_age_seconds
from tests.conftest import MANIFEST, MEDIA, REPO, base_config, deep_merge, s3_config, waha_payload
from tests.daemon import write_toml
from tests.emulators.waha import WahaEmulator

DAY = 86400.0
KEYS = [{"name": "ops", "key": "admin-key", "scopes": ["admin"]},
        {"name": "viewer", "key": "read-key", "scopes": ["read"]},
        {"name": "acme-ops", "key": "tenant-admin-key", "scopes": ["admin"], "tenant": "acme"}]
ADMIN = {"Authorization": "Bearer admin-key"}


class GatedWaha(WahaEmulator):
    """The WAHA emulator, whose file downloads wait while ``gate`` is clear (``waiting`` counts them)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def _serve_file(self, request):
        if not self.gate.is_set():
            self.waiting += 1
            await self.gate.wait()
        return await super()._serve_file(request)


@pytest.fixture
async def waha(aiohttp_server, tmp_path) -> GatedWaha:
    emu = GatedWaha(api_key="waha-key", lifetime=180.0, workdir=tmp_path / "waha-files")
    server = await aiohttp_server(emu.app, host="127.0.0.1")
    emu.base_url = str(server.make_url("")).rstrip("/")
    return emu


@pytest.fixture(params=["local", "s3"])
def backend(request) -> dict[str, Any]:
    """Settings overrides for each storage backend (S3: SeaweedFS, a fresh bucket)."""
    if request.param == "local":
        return {}
    return {"storage": {"backend": "s3", "s3": s3_config(request.getfixturevalue("s3_server"))}}


class Recorder:
    """A :class:`gateway.retention.Progress` that keeps everything it is told."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, int | None]] = []
        self.items: list[CleanupItem] = []

    def phase(self, name: str, total: int | None) -> None:
        self.phases.append((name, total))

    def item(self, item: CleanupItem) -> None:
        self.items.append(item)

    def ids(self, action: str) -> set[str | None]:
        return {i.media_id for i in self.items if i.action == action}


def _template(name: str) -> str:
    return "message_image.json" if MANIFEST[name]["category"] == "image" else "message_document.json"


async def ingest(gw, waha, sink, name: str, message_id: str, *, event: str = "message") -> dict[str, Any]:
    """Bring fixture file ``name`` in through a WAHA webhook; return the forwarded ``payload.media``."""
    url = waha.add_file(MEDIA / name, name=f"{message_id}_{name}")
    before = len(sink.deliveries)
    resp = await gw.post_waha(waha_payload(url, message_id=message_id, mimetype=MANIFEST[name]["mime"],
                                           filename=name, event=event, template=_template(name)))
    assert resp.status == 200
    deliveries = await sink.wait_for(before + 1)
    media = deliveries[before].json["payload"]["media"]
    assert media["gateway"]["sha256"] == MANIFEST[name]["sha256_hex"]
    return media


async def sql(gw, query: str, *args: Any) -> list[tuple]:
    return await gw.app[CATALOG].run(lambda db: db.conn.execute(query, args).fetchall())


async def set_media(gw, media_id: str, **values: Any) -> None:
    cols = ", ".join(f"{c} = ?" for c in values)
    await sql(gw, f"UPDATE media SET {cols} WHERE id = ?", *values.values(), media_id)


async def stored_keys(gw) -> set[str]:
    return {st.key async for st in gw.app[STORAGE].list()}


async def media_states(gw) -> dict[str, str]:
    return dict(await sql(gw, "SELECT id, state FROM media"))


async def metrics_text(gw, http) -> str:
    async with http.get(f"{gw.url}/metrics") as r:
        return await r.text()


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` (sync or async) is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


# -- the expired set ------------------------------------------------------------------------------

async def test_cleanup_deletes_exactly_the_expired_set(start_gateway, waha, sink, http, backend):
    gw = await start_gateway(api={"keys": KEYS}, retention={
        "max_age_days": 30, "category_max_age_days": {"video": 5, "document": "forever"}}, **backend)
    now = time.time()
    gw.app[RETENTION].clock = lambda: now
    plan = {  # file: (age in days, other columns, why it goes or None)
        "photo.jpg": (31, {}, "age"),                              # past the default 30 days
        "screenshot.png": (29, {}, None),
        "clip.mp4": (6, {}, "age"),                                # video: 5 days
        "invoice.pdf": (400, {}, None),                            # document: forever
        "sticker.webp": (100, {"is_public": 1}, None),             # keep_public
        "song.mp3": (1, {"expires_at": now - 1}, "expires_at"),    # its own expiry passed
        "voice.ogg": (1, {"expires_at": now + 3600}, None),
    }
    media = {}
    for name, (age, extra, _) in plan.items():
        media[name] = await ingest(gw, waha, sink, name, f"ret-{name}")
        await set_media(gw, media[name]["gateway"]["id"], created_at=now - age * DAY, **extra)
    keys = {name: (await gw.app[CATALOG].get_media(m["gateway"]["id"]))["key"] for name, m in media.items()}
    assert await stored_keys(gw) == set(keys.values())
    going = {name for name, (_, _, why) in plan.items() if why}
    expected = {why: {"objects": sum(1 for n in going if plan[n][2] == why),
                      "bytes": sum(MANIFEST[n]["size"] for n in going if plan[n][2] == why)}
                for why in ("age", "expires_at")}

    async with http.post(f"{gw.url}/api/v1/admin/cleanup?dry_run=true", headers=ADMIN) as r:
        assert r.status == 200
        dry = await r.json()
    assert dry["dry_run"] is True and dry["deleted"] == expected
    assert dry["objects"] == len(going) and dry["bytes"] == sum(MANIFEST[n]["size"] for n in going)
    assert await stored_keys(gw) == set(keys.values())  # the dry run changed nothing
    assert set((await media_states(gw)).values()) == {"stored"}

    recorder = Recorder()
    report = await gw.app[RETENTION].run(trigger="api", progress=recorder)
    assert report.error is None and report.failed == 0 and report.kept_in_use == 0
    assert report.deleted == expected and report.missing == 0 and report.listed == len(plan) - len(going)
    assert recorder.ids("delete") == {media[n]["gateway"]["id"] for n in going}
    assert await stored_keys(gw) == {keys[n] for n in plan if n not in going}
    assert set(await media_states(gw)) == {media[n]["gateway"]["id"] for n in plan if n not in going}
    for name, m in media.items():
        async with http.get(m["url"]) as r:
            assert r.status == (404 if name in going else 200), name

    text = await metrics_text(gw, http)
    name = gw.app[STORAGE].name
    assert f'gateway_cleanup_deleted_objects_total{{backend="{name}",reason="age"}} 2.0' in text
    assert f'gateway_cleanup_deleted_bytes_total{{backend="{name}",reason="expires_at"}} ' \
           f'{float(MANIFEST["song.mp3"]["size"])}' in text
    assert f'gateway_storage_operations_total{{backend="{name}",operation="delete",outcome="ok"}} 3.0' in text
    assert 'gateway_cleanup_runs_total{outcome="ok",trigger="api"} 1.0' in text
    assert 'gateway_cleanup_runs_total{outcome="dry_run",trigger="api"} 1.0' in text
    assert f'gateway_stored_objects{{backend="{name}",category="document"}} 1.0' in text
    assert f'gateway_stored_objects{{backend="{name}",category="video"}} 0.0' in text
    assert "gateway_cleanup_last_success_timestamp_seconds 0.0" not in text

    again = await gw.app[RETENTION].run()
    assert again.objects == 0 and await stored_keys(gw) == {keys[n] for n in plan if n not in going}


# -- orphans and missing objects ------------------------------------------------------------------

async def test_orphans_go_after_the_grace_period_and_lost_objects_are_marked_missing(
        start_gateway, waha, sink, http, backend):
    gw = await start_gateway(retention={"orphan_grace_hours": 24}, **backend)
    storage, retention = gw.app[STORAGE], gw.app[RETENTION]
    now = time.time()
    kept = await ingest(gw, waha, sink, "photo.jpg", "orph-1")
    lost = await ingest(gw, waha, sink, "song.mp3", "orph-2")
    lost_row = await gw.app[CATALOG].get_media(lost["gateway"]["id"])
    assert await storage.delete(lost_row["key"], bucket=lost_row["bucket"])  # gone behind our back
    orphan = f"waha/default/2020/01/01/image/{new_media_id()}.jpg"  # a crash between put and row
    await storage.put(orphan, _chunks(b"orphan bytes"), "image/jpeg", {}, category="image")
    await storage.put("notes/readme.txt", _chunks(b"not ours"), "text/plain", {})
    async with http.get(kept["gateway"]["thumbnail"]) as r:  # a thumbnail belongs to its original's row
        assert r.status == 200
    orphan_thumb = f"{orphan}.thumb-256.webp"  # an orphan's thumbnail is an orphan too
    await storage.put(orphan_thumb, _chunks(b"orphan thumb"), "image/webp", {}, category="image")
    keys = await stored_keys(gw)

    retention.clock = lambda: now
    report = await retention.run()
    assert report.objects == 0 and report.orphans_in_grace == 3 and report.foreign_objects == 1
    assert report.missing == 1 and report.missing_ids == [lost["gateway"]["id"]]
    assert await stored_keys(gw) == keys
    assert (await media_states(gw)) == {kept["gateway"]["id"]: "stored", lost["gateway"]["id"]: "missing"}
    text = await metrics_text(gw, http)
    assert f'gateway_media_missing_objects{{backend="{storage.name}"}} 1.0' in text
    assert f'gateway_stored_objects{{backend="{storage.name}",category="audio"}} 0.0' in text
    assert f'gateway_stored_objects{{backend="{storage.name}",category="image"}} 1.0' in text

    retention.clock = lambda: now + 2 * DAY  # past the grace period
    dry = await retention.run(dry_run=True)
    orphans = {"orphan": {"objects": 2, "bytes": len(b"orphan bytes") + len(b"orphan thumb")}}
    assert dry.deleted == orphans
    assert await stored_keys(gw) == keys
    report = await retention.run()
    assert report.deleted == orphans
    assert report.foreign_objects == 1 and report.missing == 0  # reported once; the row stays missing
    assert await stored_keys(gw) == keys - {orphan, orphan_thumb}

    # the lost attachment arrives again (message.any of the same message): fetched anew
    again = await ingest(gw, waha, sink, "song.mp3", "orph-2", event="message.any")
    assert again["gateway"]["id"] != lost["gateway"]["id"]
    async with http.get(again["url"]) as r:
        assert r.status == 200 and len(await r.read()) == MANIFEST["song.mp3"]["size"]


# -- jobs that still need objects -----------------------------------------------------------------

async def test_cleanup_keeps_what_queued_and_running_jobs_need(start_gateway, waha, sink, http):
    gw = await start_gateway(queue={"max_attempts": 1000, "backoff_base": 0.02, "backoff_max": 0.05},
                             retention={"max_age_days": 7})
    retention = gw.app[RETENTION]
    retention.clock = lambda: time.time() + 10 * DAY  # everything stored so far is expired
    x = await ingest(gw, waha, sink, "photo.jpg", "old-x")
    y = await ingest(gw, waha, sink, "clip.mp4", "old-y")
    z = await ingest(gw, waha, sink, "song.mp3", "old-z")

    # old-x again as message.any: its ingest reuses X, and its delivery keeps failing (queued)
    sink.fail_next = 10**9
    redelivered = waha_payload(x["gateway"]["original_url"], message_id="old-x", event="message.any")
    assert (await gw.post_waha(redelivered)).status == 200
    # a new message quoting old-y, while its own attachment is still downloading (running)
    waha.gate.clear()
    url = waha.add_file(MEDIA / "invoice.pdf", name="new-1.pdf")
    reply = waha_payload(url, message_id="new-1", mimetype="application/pdf", filename="invoice.pdf",
                         template="message_document.json")
    reply["payload"]["replyTo"] = {"id": "old-y", "body": "that clip",
                                   "media": {"url": y["gateway"]["original_url"], "mimetype": "video/mp4"}}
    assert (await gw.post_waha(reply)).status == 200
    await until(lambda: waha.waiting >= 1 and sink.attempts > 3)

    report = await retention.run()
    assert report.error is None and report.kept_in_use == 2
    assert report.deleted == {"age": {"objects": 1, "bytes": MANIFEST["song.mp3"]["size"]}}
    states = await media_states(gw)
    assert states == {x["gateway"]["id"]: "stored", y["gateway"]["id"]: "stored"}
    assert z["gateway"]["id"] not in states

    sink.fail_next = 0
    waha.gate.set()
    deliveries = await sink.wait_for(5)
    by_event = {(d.json["event"], d.json["payload"]["id"]): d.json["payload"] for d in deliveries}
    links = {"photo.jpg": by_event[("message.any", "old-x")]["media"]["url"],
             "invoice.pdf": by_event[("message", "new-1")]["media"]["url"],
             "clip.mp4": by_event[("message", "new-1")]["replyTo"]["media"]["url"]}
    for name, link in links.items():
        async with http.get(link) as r:
            assert r.status == 200 and len(await r.read()) == MANIFEST[name]["size"], name

    # once no job needs them, they go like the rest
    await until(_no_active_jobs(gw))
    report = await retention.run()
    assert report.kept_in_use == 0 and report.objects == 3 and await stored_keys(gw) == set()


def _no_active_jobs(gw) -> Callable[[], Any]:
    async def check() -> bool:
        return await gw.count("jobs", "state IN ('queued', 'running')") == 0
    return check


async def test_what_an_ingest_stores_during_a_run_is_kept(start_gateway, waha, sink, http):
    """Webhooks arrive while a slow run (one row per batch, no orphan grace) goes on: nothing
    they store is deleted or marked missing, whatever the interleaving."""
    gw = await start_gateway(retention={"max_age_days": 7, "batch_size": 1, "orphan_grace_hours": 0})
    retention = gw.app[RETENTION]
    retention.clock = lambda: time.time() + 10 * DAY
    old = [await ingest(gw, waha, sink, name, f"burst-old-{name}") for name in ("photo.jpg", "song.mp3")]
    names = ["clip.mp4", "invoice.pdf", "sticker.webp", "screenshot.png", "voice.ogg", "report.docx"]
    before = len(sink.deliveries)
    run = retention.spawn()
    for name in names:
        url = waha.add_file(MEDIA / name, name=f"burst-{name}")
        await gw.post_waha(waha_payload(url, message_id=f"burst-{name}", mimetype=MANIFEST[name]["mime"],
                                        filename=name, template=_template(name)))
    report = await run
    deliveries = (await sink.wait_for(before + len(names)))[before:]
    await until(_no_active_jobs(gw))
    assert report.error is None and report.deleted["age"]["objects"] == len(old)
    for d in deliveries:
        media = d.json["payload"]["media"]
        async with http.get(media["url"]) as r:
            assert r.status == 200 and (await r.read()) == (MEDIA / media["filename"]).read_bytes()
    assert set((await media_states(gw)).values()) == {"stored"}
    assert len(await stored_keys(gw)) == len(names)


# -- one run at a time, the admin endpoint, the schedule -----------------------------------------

async def test_one_run_at_a_time_and_only_for_admins(start_gateway, http):
    gw = await start_gateway(api={"keys": KEYS})
    url = f"{gw.url}/api/v1/admin/cleanup"
    async with http.post(url) as r:
        assert r.status == 401
    for key in ("read-key", "tenant-admin-key"):
        async with http.post(url, headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 403, key
    async with http.post(f"{url}?dry_run=maybe", headers=ADMIN) as r:
        assert r.status == 400

    retention = gw.app[RETENTION]
    first, second = retention.spawn(), retention.spawn()  # both before either started
    assert (await first).error is None
    with pytest.raises(CleanupBusy):
        await second
    fd = os.open(retention.lock_path, os.O_RDWR | os.O_CREAT)  # as `gateway cleanup` in another process
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        async with http.post(url, headers=ADMIN) as r:
            assert r.status == 409 and "another process" in (await r.json())["error"]
    finally:
        os.close(fd)
    async with http.post(url, headers=ADMIN) as r:
        body = await r.json()
        assert r.status == 200 and body["trigger"] == "api" and body["dry_run"] is False
    assert 'gateway_cleanup_runs_total{outcome="busy",trigger="api"} 2.0' in await metrics_text(gw, http)
    [run, *_] = await gw.app[CATALOG].cleanup_runs()
    assert run["trigger"] == "api" and run["ok"] == 1 and run["report"]["objects"] == 0


async def test_the_schedule_runs_in_the_app_and_stops_with_it(aiohttp_server, unused_tcp_port, tmp_path):
    data = deep_merge(base_config(tmp_path, unused_tcp_port, None, None),
                      {"retention": {"schedule": "*/5 * * * *"}})
    app = create_app(Settings(config_dir=tmp_path, **data))
    server = await aiohttp_server(app, host="127.0.0.1", port=unused_tcp_port)
    retention = app[RETENTION]
    job = retention.scheduler.get_job("retention")
    assert 0 < (job.next_run_time - datetime.now(timezone.utc)).total_seconds() <= 300
    job.modify(next_run_time=datetime.now(timezone.utc))  # due now, instead of waiting for it
    retention.scheduler.wakeup()

    async def ran() -> bool:
        return any(r["trigger"] == "schedule" and r["ok"] for r in await app[CATALOG].cleanup_runs())
    await until(ran)
    assert app[METRICS].registry.get_sample_value(
        "gateway_cleanup_runs_total", {"trigger": "schedule", "outcome": "ok"}) == 1.0
    scheduler = retention.scheduler
    await server.close()
    assert retention.scheduler is None and not scheduler.running


def test_crontab_lines_mean_what_crontab_says():
    saturday = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)

    def next_fire(line: str, tz: str = "UTC") -> datetime:
        return crontab_trigger(line, tz).get_next_fire_time(None, saturday)

    assert next_fire("17 3 * * *") == datetime(2026, 11, 22, 3, 17, tzinfo=timezone.utc)
    for sunday in ("0 3 * * 0", "0 3 * * 7", "0 3 * * sun"):  # APScheduler 3 alone reads 0 as Monday
        assert next_fire(sunday).strftime("%a %H:%M") == "Sun 03:00"
    assert next_fire("0 3 * * 1-5").strftime("%a %d") == "Mon 23"
    assert next_fire("0 3 * * */2").strftime("%a %d") == "Sun 22"  # 0,2,4,6
    assert next_fire("30 2 * * *", "Europe/Berlin").astimezone(timezone.utc).hour == 1
    for bad, message in [("0 3 * *", "5 fields"), ("0 3 1 * 1", "not both"), ("0 3 * * 8", "0-7"),
                         ("61 3 * * *", "59"), ("0 3 * * fri-mon", "backwards")]:
        with pytest.raises(ValueError, match=message):
            crontab_trigger(bad)


@pytest.mark.parametrize("text,setting", [
    ('[retention]\nschedule = "every night"\n', "retention.schedule"),
    ('[retention]\ntimezone = "Mars/Olympus"\n', "retention.timezone"),
    ('[retention]\ncategory_max_age_days = {videos = 3}\n', "retention.category_max_age_days"),
    ('[retention]\nmax_age_days = 0\n', "retention.max_age_days"),
    ('[retention]\nmax_age_days = "never"\n', "retention.max_age_days"),
])
def test_bad_retention_settings_name_the_setting(tmp_path, text, setting):
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(setting)


def test_the_repository_config_has_a_retention_section_that_runs():
    s = load_settings(REPO / "gateway.toml").retention
    assert s.enabled and s.max_age_days == 90 and s.schedule == "17 3 * * *"
    assert max_age_seconds(s, "waha", "video") == 90 * DAY


# -- pruning, failures, the command line ----------------------------------------------------------

async def test_old_events_and_done_jobs_are_pruned_dead_ones_kept(start_gateway, waha, sink):
    gw = await start_gateway(retention={"events_max_age_days": 30, "done_jobs_max_age_days": 7})
    await ingest(gw, waha, sink, "photo.jpg", "prune-1")
    await ingest(gw, waha, sink, "song.mp3", "prune-2")
    sink.fail_next, sink.fail_status = 1, 400  # the bot refuses this one: a dead delivery job
    await gw.post_waha({"event": "message", "session": "default", "payload": {"id": "prune-3"}})
    await until(lambda: gw.count("jobs", "state = 'dead'"))
    now = time.time()
    await sql(gw, "UPDATE events SET received_at = ?", now - 40 * DAY)
    await sql(gw, "UPDATE jobs SET updated_at = ?", now - 10 * DAY)
    retention = gw.app[RETENTION]
    retention.clock = lambda: now

    dry = await retention.run(dry_run=True)
    # 2 events with 2 jobs each; prune-3 has no media, so no ingest job, only its dead delivery
    assert dry.pruned == {"events": 2, "jobs": 4}
    assert await gw.count("events") == 3 and await gw.count("jobs") == 5
    report = await retention.run()
    assert report.pruned == {"events": 2, "jobs": 4}
    assert await sql(gw, "SELECT message_id FROM events") == [("prune-3",)]
    assert await sql(gw, "SELECT kind, state FROM jobs") == [("deliver", "dead")]
    assert await gw.count("media") == 2  # media has its own age


async def test_a_failed_delete_keeps_the_row_for_the_next_run(start_gateway, waha, sink, own_s3_server):
    gw = await start_gateway(storage={"backend": "s3", "s3": s3_config(own_s3_server)}, retention={"reconcile": False})
    retention = gw.app[RETENTION]
    stored = [await ingest(gw, waha, sink, name, f"fail-{name}") for name in ("photo.jpg", "song.mp3")]
    retention.clock = lambda: time.time() + 100 * DAY
    own_s3_server.stop()  # S3 unreachable
    report = await retention.run()
    assert report.failed == 2 and report.objects == 0 and len(report.errors) == 2
    assert set((await media_states(gw)).values()) == {"deleting"}  # claimed, not served for reuse
    own_s3_server.start()  # the same data directory and ports
    report = await retention.run()  # finishes what the last run could not
    assert report.failed == 0 and report.deleted == {"age": {
        "objects": 2, "bytes": sum(MANIFEST[n]["size"] for n in ("photo.jpg", "song.mp3"))}}
    assert await gw.count("media") == 0 and await stored_keys(gw) == set()
    assert len(stored) == 2


async def _cli(config, *args: str, tty: bool = False) -> tuple[int, str]:
    """Run ``gateway cleanup`` as a subprocess; with ``tty``, stdout and stderr are a terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    cmd = [sys.executable, "-m", "gateway", "cleanup", "--config", str(config), *args]
    if not tty:
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode()
    primary, secondary = pty.openpty()
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, env={**env, "COLUMNS": "100"},
                                                stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []

    def read() -> None:
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = asyncio.get_running_loop().run_in_executor(None, read)
    code = await proc.wait()
    await reader
    os.close(primary)
    return code, b"".join(chunks).decode(errors="replace")


async def test_cli_dry_run_shows_progress_on_a_terminal_then_a_real_run_deletes(
        start_gateway, waha, sink, tmp_path, unused_tcp_port):
    gw = await start_gateway(retention={"max_age_days": 1})
    media = [await ingest(gw, waha, sink, name, f"cli-{name}") for name in ("photo.jpg", "clip.mp4", "song.mp3")]
    now = time.time()
    for m in media[:2]:
        await set_media(gw, m["gateway"]["id"], created_at=now - 2 * DAY)
    keys = await stored_keys(gw)
    config = write_toml(tmp_path / "cli.toml", {
        "catalog": {"path": str(gw.settings.catalog.path)},
        "storage": {"backend": "local", "local": {"root": str(gw.media_root)}},
        "retention": {"max_age_days": 1},
        "log": {"format": "json"},
    })
    size = MANIFEST["photo.jpg"]["size"] + MANIFEST["clip.mp4"]["size"]

    code, out = await _cli(config, "--dry-run", "--verbose", tty=True)
    assert code == 0, out
    assert f"would delete 2 objects, {size} bytes" in out and "dry run: nothing was changed" in out
    assert "expired objects" in out and "2/2" in out  # click's progress bar, drawn on the terminal
    listed = [line for line in out.splitlines() if "would delete  age" in line]
    assert len(listed) == 2 and all(line.startswith("\x1b[K") for line in listed), repr(out)  # bar cleared
    assert await stored_keys(gw) == keys

    code, out = await _cli(config)
    assert code == 0, out
    assert f"deleted 2 objects, {size} bytes" in out and "expired objects" not in out  # no bar in a pipe
    assert await stored_keys(gw) == {(await gw.app[CATALOG].get_media(media[2]["gateway"]["id"]))["key"]}
    assert [r[0] for r in await sql(gw, "SELECT id FROM media")] == [media[2]["gateway"]["id"]]
    [run, *_] = await gw.app[CATALOG].cleanup_runs()
    assert run["trigger"] == "cli" and run["report"]["objects"] == 2

    fd = os.open(gw.app[RETENTION].lock_path, os.O_RDWR | os.O_CREAT)  # a run in progress elsewhere
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, out = await _cli(config)
        assert code == 3 and "another process is running a cleanup" in out
    finally:
        os.close(fd)
