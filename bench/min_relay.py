"""The baseline of ``bench/latency.py`` (issue 12, B7): a minimal durable relay in one aiohttp
process, the least a gateway can do and still lose nothing it acknowledged.

On ``POST /webhooks/{provider}`` (a WAHA ``message`` webhook) it INSERTs the body into SQLite and
COMMITs (WAL, ``synchronous=FULL``, one commit per webhook), answers 200, then, as a task, GETs
``payload.media.url`` with aiohttp (``X-Api-Key``), SHA-256s it while writing it to
``<storage>/<row id><ext>``, fsyncs the file and the directory, and POSTs the message to the bot
URL with ``payload.media.stored = {path, sha256, size}``. No job table, no retries: a failure is
printed and the message dropped.

``--record-stored``: before the forward, it also records what it stored in the message's row
(``UPDATE`` + ``COMMIT``, durable): the one commit a relay that keeps a catalog of its stored media
cannot skip, since the forwarded link must still resolve after a power loss. Not the issue's
baseline; a reference for what that commit costs.

The SQLite work runs on one dedicated thread, not on the event loop: a COMMIT waits for an fsync
(milliseconds), and inline it would stall every download and forward in flight, which would make
the baseline slower than a minimal relay needs to be. Hashing and writing the (small) chunks run
on the loop; the fsyncs run on the default thread pool. Prints ``port <n>`` once listening::

    .venv/bin/python -m bench.min_relay --db /tmp/r.db --storage /tmp/r --bot-url http://127.0.0.1:9000/hook
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

CHUNK = 64 * 1024  # bytes per read of the media body


class Relay:
    """The relay's state: the SQLite connection (used on :attr:`db_thread` only), the storage
    directory, the bot URL, the WAHA API key and the tasks in flight."""

    def __init__(self, db: Path, storage: Path, bot_url: str, api_key: str, record_stored: bool = False):
        self.record_stored = record_stored
        self.db_thread = ThreadPoolExecutor(1, thread_name_prefix="relay-db")
        self.conn = self.db_thread.submit(self._open, db).result()
        self.storage = storage
        self.bot_url = bot_url
        self.api_key = api_key
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    @staticmethod
    def _open(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, raw BLOB NOT NULL, stored TEXT)")
        return conn

    def _insert(self, body: bytes) -> int:
        self.conn.execute("BEGIN IMMEDIATE")
        row = self.conn.execute("INSERT INTO messages (raw) VALUES (?)", (body,)).lastrowid
        self.conn.execute("COMMIT")
        assert row is not None
        return row

    def _stored(self, row: int, stored: str) -> None:
        """On :attr:`db_thread`: record what message ``row``'s relay stored (``--record-stored``)."""
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("UPDATE messages SET stored = ? WHERE id = ?", (stored, row))
        self.conn.execute("COMMIT")

    async def receive(self, request: web.Request) -> web.Response:
        """Commit the webhook, start its relay task, answer 200; 400 for a body that is not JSON."""
        body = await request.read()
        try:
            message: dict[str, Any] = json.loads(body)
            url = message["payload"]["media"]["url"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "not a WAHA message webhook with payload.media.url"}, status=400)
        row = await asyncio.get_running_loop().run_in_executor(self.db_thread, self._insert, body)
        task = asyncio.create_task(self.relay(row, message, url))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return web.json_response({"ok": True})

    async def relay(self, row: int, message: dict[str, Any], url: str) -> None:
        """Fetch, hash, write, fsync (file and directory), forward."""
        assert self.http is not None
        path = self.storage / f"{row}{Path(url).suffix}"
        digest = hashlib.sha256()
        size = 0
        try:
            async with self.http.get(url, headers={"X-Api-Key": self.api_key}) as r:
                r.raise_for_status()
                with path.open("wb") as fh:
                    async for chunk in r.content.iter_chunked(CHUNK):
                        digest.update(chunk)
                        fh.write(chunk)
                        size += len(chunk)
                    fh.flush()
                    await asyncio.to_thread(os.fsync, fh.fileno())
            await asyncio.to_thread(_fsync_dir, self.storage)
            message["payload"]["media"]["stored"] = {"path": str(path), "sha256": digest.hexdigest(), "size": size}
            if self.record_stored:
                await asyncio.get_running_loop().run_in_executor(
                    self.db_thread, self._stored, row, json.dumps(message["payload"]["media"]["stored"]))
            async with self.http.post(self.bot_url, json=message) as r:
                await r.read()
                r.raise_for_status()
        except (aiohttp.ClientError, OSError) as exc:
            print(f"message {row} dropped: {type(exc).__name__}: {exc}", flush=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="default 0: a free port (printed)")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--storage", type=Path, required=True, help="directory for the media files")
    parser.add_argument("--bot-url", required=True)
    parser.add_argument("--api-key", default="waha-key", help="WAHA's X-Api-Key")
    parser.add_argument("--record-stored", action="store_true",
                        help="commit what was stored (durable) before the forward")
    args = parser.parse_args()
    args.storage.mkdir(parents=True, exist_ok=True)
    relay = Relay(args.db, args.storage, args.bot_url, args.api_key, args.record_stored)

    async def session(app: web.Application) -> Any:
        relay.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        yield
        await asyncio.gather(*relay.tasks, return_exceptions=True)
        await relay.http.close()

    app = web.Application()
    app.router.add_post("/webhooks/{provider}", relay.receive)
    app.cleanup_ctx.append(session)
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    print(f"port {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
