"""``gateway migrate --to postgresql://...``: an SQLite catalog copied into PostgreSQL (a real
server, tests/postgres.py) by the command line as a subprocess, then read through the contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.catalog import SQLiteCatalog
from gateway.catalog.postgres import PostgresCatalog
from gateway.sdk.provider import MediaRef, WebhookEvent


def _migrate(config: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "migrate", "--config", str(config), "--to", url],
                          capture_output=True, text=True, timeout=60)


async def test_migrate_copies_every_row_and_new_ids_continue(tmp_path, postgres_server):
    db = tmp_path / "var" / "gateway.db"
    config = tmp_path / "gateway.toml"
    config.write_text('[catalog]\npath = "var/gateway.db"\n')
    source = SQLiteCatalog(db)
    await source.open()
    events = [WebhookEvent(idempotency_key=f"k{i}", event="message", account="default", payload={"n": i},
                           media=[MediaRef(path="p", url="http://x/f", source_key=f"s{i}", mimetype="image/png")],
                           chat="1@c.us", message_id=f"m{i}") for i in range(5)]
    accepted, _, _ = await source.record_webhook("waha", b"\x00raw\xff", events, now=10.0)
    job = await source.claim_job(now=10.0)
    await source.complete_job(job["id"], [("deliver", "deliver:x", {"event_id": accepted[0]})],
                              (accepted[0], {"state": "forwarded", "forward": {"status": 200}}))
    running = await source.claim_job(now=10.0)  # left running, as by a crash
    await source.insert_media({"id": "m_1", "sha256": "0" * 64, "size": 7, "mimetype": "image/png",
                               "category": "image", "filename": "a.png", "backend": "local", "key": "k/1",
                               "source_key": "s0", "created_at": 11.0, "is_public": 1, "extra": '{"a": 1}'})
    await source.record_cleanup_run("cli", 1.0, 2.0, ok=True, report={"objects": 0})
    jobs_before = await source.list_jobs()
    await source.close()

    url = postgres_server.create_database()
    result = _migrate(config, url)
    assert result.returncode == 0, result.stderr
    assert "copied 5 events, 6 jobs, 1 media, 1 cleanup_runs" in result.stdout

    target = PostgresCatalog(url)
    await target.open()
    try:
        assert await target.list_jobs() == jobs_before
        event = await target.get_event(accepted[0])
        assert event["raw"] == b"\x00raw\xff" and event["forward"] == {"status": 200}
        assert event["media"][0]["source_key"] == "s0"
        media = await target.get_media("m_1")
        assert (media["size"], media["is_public"], media["extra"], media["state"]) == (7, 1, '{"a": 1}', "stored")
        assert (await target.cleanup_runs())[0]["report"] == {"objects": 0}
        assert await target.requeue_running() == 1  # the crashed job, without a lease, runs again
        assert (await target.get_job(running["id"]))["state"] == "queued"
        await target.enqueue("deliver", "deliver:new", {})
        assert max(j["id"] for j in await target.list_jobs()) == max(j["id"] for j in jobs_before) + 1
        _, dups, _ = await target.record_webhook("waha", b"again", events[:1])
        assert dups == ["k0"]  # idempotency keys came along
    finally:
        await target.close()

    again = _migrate(config, url)  # never into a catalog that holds rows
    assert again.returncode == 1 and "not empty" in again.stderr and again.stdout == ""


async def test_migrate_refuses_a_catalog_in_use_and_a_bad_url(tmp_path, postgres_server):
    config = tmp_path / "gateway.toml"
    config.write_text('[catalog]\npath = "gateway.db"\n')
    daemon = SQLiteCatalog(tmp_path / "gateway.db", exclusive=True)
    await daemon.open()
    try:
        result = _migrate(config, postgres_server.create_database())
        assert result.returncode == 2 and "in use by process" in result.stderr and "stop it first" in result.stderr
    finally:
        await daemon.close()
    bad = _migrate(config, "mysql://x/y")
    assert bad.returncode == 2 and bad.stderr.startswith("gateway: --to: must be a postgresql://")
