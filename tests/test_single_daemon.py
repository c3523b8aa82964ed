"""One daemon per catalog: a second ``gateway serve`` on the same catalog, or on a busy port, is
refused in one line with exit status 2 and touches nothing; the first keeps running its jobs."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path

import aiohttp

from tests.conftest import MANIFEST, MEDIA, REPO, base_config, deep_merge, waha_payload
from tests.daemon import GatewayProcess, write_toml


async def _serve(config: Path, timeout: float = 20.0) -> tuple[int, str, str]:
    """``gateway serve`` run to its end (it must exit): (status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), cwd=REPO, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    return proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode()


def _jobs(db: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT kind, state FROM jobs ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_a_second_daemon_on_the_same_catalog_is_refused_and_touches_nothing(
        tmp_path, waha, sink, unused_tcp_port_factory):
    first_port, second_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    data = deep_merge(base_config(tmp_path, first_port, waha, sink), {"log": {"level": "INFO"}})
    first = GatewayProcess(write_toml(tmp_path / "gateway.toml", data), first_port, tmp_path / "first.log")
    # the same catalog, another port: nothing but the catalog's lock can stop it
    second_config = write_toml(tmp_path / "second.toml",
                               deep_merge(data, {"server": {"port": second_port}}))
    waha.delay = 6.0  # the ingest job stays running while the second daemon tries to start (two interpreter starts, slow under load)
    await first.start()
    try:
        url = waha.add_file(MEDIA / "photo.jpg")
        async with aiohttp.ClientSession() as http:
            body = json.dumps(waha_payload(url, message_id="single-1", filename="photo.jpg"))
            async with http.post(f"{first.url}/webhooks/waha", data=body) as r:
                assert r.status == 200
        db = tmp_path / "var" / "gateway.db"
        for _ in range(100):
            if ("ingest", "running") in _jobs(db):
                break
            await asyncio.sleep(0.02)
        assert _jobs(db) == [("ingest", "running")]

        status, out, err = await _serve(second_config)
        assert status == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert f"process {first.pid}" in lines[0] and "catalog" in lines[0], lines[0]
        assert "listening on" not in out + err and "gateway ready" not in out + err
        assert _jobs(db) == [("ingest", "running")]  # not requeued under the first daemon's feet

        # the same config word for word (same port too): the catalog's holder is named
        status, out, err = await _serve(tmp_path / "gateway.toml")
        assert status == 2 and len(err.strip().splitlines()) == 1 and f"process {first.pid}" in err, err

        [delivery] = await sink.wait_for(1, timeout=20)
        assert delivery.json["payload"]["media"]["gateway"]["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
        await asyncio.sleep(0.3)
        assert len(sink.deliveries) == 1  # delivered once
        assert "requeued" not in first.log_tail(200)
        assert await first.terminate() == 0
    finally:
        if first.proc and first.proc.poll() is None:
            first.kill()
    # the lock went with the first daemon: a new one starts on the catalog
    second = GatewayProcess(second_config, second_port, tmp_path / "second.log")
    await second.start()
    assert await second.terminate() == 0


async def test_an_address_in_use_is_one_line_and_exit_2(tmp_path, unused_tcp_port):
    busy = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", unused_tcp_port)
    try:
        data = deep_merge(base_config(tmp_path, unused_tcp_port, None, None), {})
        status, out, err = await _serve(write_toml(tmp_path / "gateway.toml", data))
    finally:
        busy.close()
        await busy.wait_closed()
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == f"gateway: cannot listen on 127.0.0.1:{unused_tcp_port}: Address already in use"
    assert not (tmp_path / "var" / "gateway.db").exists()  # nothing opened before the port
