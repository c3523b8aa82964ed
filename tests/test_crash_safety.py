"""Durability with a real daemon process: SIGKILL right after the 200s, SIGTERM mid-download."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp

from tests.conftest import MANIFEST, MEDIA, base_config, deep_merge, waha_payload
from tests.daemon import GatewayProcess, write_toml


def _db_rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _daemon(tmp_path: Path, port: int, waha, sink, **overrides) -> GatewayProcess:
    data = deep_merge(base_config(tmp_path, port, waha, sink), overrides)
    config = write_toml(tmp_path / "gateway.toml", data)
    return GatewayProcess(config, port, tmp_path / "daemon.log")


async def test_sigkill_after_200_loses_nothing(tmp_path, waha, sink, unused_tcp_port):
    waha.delay = 0.4  # keep downloads in flight when the daemon dies
    names = sorted(MANIFEST)
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, log={"level": "INFO"})
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:
            for name in names:
                url = waha.add_file(MEDIA / name)
                body = json.dumps(waha_payload(url, message_id=f"crash-{name}", filename=name))
                async with http.post(f"{daemon.url}/webhooks/waha", data=body) as r:
                    assert r.status == 200
        daemon.kill()
        assert len(sink.deliveries) < len(names), "the kill came too late to test anything"
        committed = _db_rows(tmp_path / "var" / "gateway.db", "SELECT COUNT(*) FROM events")[0][0]
        assert committed == len(names)  # every 200 was backed by a committed event

        waha.delay = 0.0
        await daemon.start()
        await sink.wait_for(len(names), timeout=30)
        assert await daemon.terminate() == 0
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.kill()
    forwarded = {d.json["payload"]["id"]: d.json["payload"]["media"] for d in sink.deliveries}
    assert set(forwarded) == {f"crash-{n}" for n in names}
    for name in names:
        assert forwarded[f"crash-{name}"]["gateway"]["sha256"] == MANIFEST[name]["sha256_hex"]
    db = tmp_path / "var" / "gateway.db"
    assert _db_rows(db, "SELECT COUNT(*) FROM media")[0][0] == len(names)
    assert _db_rows(db, "SELECT COUNT(*) FROM jobs WHERE state != 'done'")[0][0] == 0
    objects = [p for p in (tmp_path / "var" / "media").rglob("*") if p.is_file() and ".meta" not in p.parts]
    assert len(objects) == len(names)  # no duplicates, no temp files left behind
    assert "requeued" in daemon.log_tail(400)


async def test_sigterm_returns_an_unfinished_download_to_the_queue(tmp_path, waha, sink, unused_tcp_port):
    waha.delay = 3.0
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, server={"shutdown_grace": 0.3})
    await daemon.start()
    url = waha.add_file(MEDIA / "photo.jpg")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/webhooks/waha",
                             data=json.dumps(waha_payload(url, message_id="term-1"))) as r:
            assert r.status == 200
    while not waha.requests:
        await asyncio.sleep(0.02)
    assert await daemon.terminate(timeout=10) == 0
    db = tmp_path / "var" / "gateway.db"
    assert _db_rows(db, "SELECT state, attempts FROM jobs WHERE kind='ingest'") == [("queued", 0)]

    waha.delay = 0.0
    await daemon.start()
    [d] = await sink.wait_for(1, timeout=15)
    assert d.json["payload"]["media"]["gateway"]["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
    assert await daemon.terminate() == 0


async def test_sigterm_lets_a_running_download_finish(tmp_path, waha, sink, unused_tcp_port):
    waha.delay = 1.0
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, server={"shutdown_grace": 10})
    await daemon.start()
    url = waha.add_file(MEDIA / "photo.jpg")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/webhooks/waha",
                             data=json.dumps(waha_payload(url, message_id="term-2"))) as r:
            assert r.status == 200
    while not waha.requests:
        await asyncio.sleep(0.02)
    assert await daemon.terminate(timeout=15) == 0
    db = tmp_path / "var" / "gateway.db"
    assert _db_rows(db, "SELECT state FROM jobs WHERE kind='ingest'") == [("done",)]
    assert _db_rows(db, "SELECT COUNT(*) FROM media")[0][0] == 1
    # the delivery it enqueued waits in the queue for the next start
    await daemon.start()
    await sink.wait_for(1, timeout=15)
    assert await daemon.terminate() == 0
