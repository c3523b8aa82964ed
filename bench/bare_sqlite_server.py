"""The baseline of ``bench/webhooks.py``: a bare aiohttp server that answers each ``POST`` with
``200`` after one SQLite ``INSERT`` + ``COMMIT`` of the body (WAL, ``synchronous=FULL``, the
catalog's durability), done inline on the event loop, as the simplest durable webhook receiver
would. Prints ``port <n>`` once listening.

    .venv/bin/python -m bench.bare_sqlite_server --db /tmp/x.db
"""

from __future__ import annotations

import argparse
import socket
import sqlite3

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    conn = sqlite3.connect(args.db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, received_at REAL, raw BLOB)")

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO events (received_at, raw) VALUES (julianday('now'), ?)", (body,))
        conn.execute("COMMIT")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/webhooks/{provider}", receive)
    run_on_a_free_port(app)


def run_on_a_free_port(app: web.Application) -> None:
    """Run ``app`` on 127.0.0.1 at a free port, without an access log; print ``port <n>`` first."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"port {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
