"""Several gateway replicas as real subprocesses (``python -m gateway serve``) on one PostgreSQL
catalog and one S3 bucket, each with its own port and directory, as on separate hosts: the replica
kill test (tests/test_replicas.py) and ``bench/replicas.py`` use it."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import base_config, deep_merge
from tests.daemon import GatewayProcess, write_toml


class ReplicaSet:
    """``n`` replicas. ``catalog_url``: the shared PostgreSQL database; ``storage``: the shared
    ``[storage]`` table; ``overrides``: more settings for all; ``ports``: one per replica."""

    def __init__(self, root: Path, ports: list[int], catalog_url: str, storage: dict[str, Any],
                 waha: Any, sink: Any, **overrides: Any):
        self.catalog_url = catalog_url
        self.procs: list[GatewayProcess] = []
        for i, port in enumerate(ports):
            home = root / f"replica-{i}"
            home.mkdir(parents=True, exist_ok=True)
            data = deep_merge(base_config(home, port, waha, sink), copy.deepcopy(
                {"catalog": {"url": catalog_url}, "storage": storage, **overrides}))
            self.procs.append(GatewayProcess(write_toml(home / "gateway.toml", data), port, home / "daemon.log"))

    async def start(self) -> None:
        """Start every replica; return when all answer ``/healthz``."""
        await asyncio.gather(*(p.start(timeout=30) for p in self.procs))

    async def stop(self) -> None:
        """SIGTERM the replicas still running (SIGKILL one that ignores it)."""
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is None:
                try:
                    await p.terminate(timeout=15)
                except TimeoutError:
                    pass

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the shared catalog directly."""
        with psycopg.connect(self.catalog_url) as conn:
            return conn.execute(query.encode(), params).fetchall()

    def running_jobs_of(self, proc: GatewayProcess) -> list[int]:
        """Ids of the running jobs leased by ``proc`` (its replica id holds its PID)."""
        return [r[0] for r in self.rows("SELECT id FROM jobs WHERE state = 'running' AND owner LIKE %s",
                                        f"%:{proc.pid}:%")]
