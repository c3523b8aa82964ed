"""A throwaway PostgreSQL server for the tests and benchmarks (Debian's ``postgresql`` package, which
``scripts/system-deps`` installs): ``initdb`` in a fresh directory, ``pg_ctl start`` on an ephemeral
port on 127.0.0.1 with durability off for speed (``fsync=off``), ``pg_ctl stop`` at the end.

``initdb``/``pg_ctl`` refuse to run as root: as root they run as the ``postgres`` user (``runuser``),
in a ``tempfile.mkdtemp()`` directory it owns (it must traverse every parent, so not pytest's
``tmp_path``). :meth:`PostgresServer.create_database` gives each test its own database.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.seaweed import free_ports


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: run scripts/system-deps (Debian: apt-get install postgresql)")
    return Path(initdb).parent


class PostgresServer:
    """One PostgreSQL server: :meth:`start`, :meth:`create_database`, :meth:`url`, :meth:`stop`."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.port = 0
        self._as_root = os.geteuid() == 0
        self._count = 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> PostgresServer:
        """initdb and start; returns self."""
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_ports(1)[0]
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C.UTF-8")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
                " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w", "-t", "30",
                  "-o", opts, "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        """The ``postgresql://`` URL of database ``dbname``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        self._count += 1
        name = f"{prefix}_{os.getpid()}_{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
