"""What a SQLite catalog's commits write: the WAL frames (one page each, with its page number) that
a running daemon appends, counted by the table or index the page belongs to.

:class:`WalRecorder` opens a read transaction on the catalog and holds it: while a reader holds a
snapshot, SQLite can neither copy the WAL frames after it into the database file nor start the
WAL over, so every frame the daemon writes meanwhile stays in the ``-wal`` file. The frame header
and the wal-index header follow https://www.sqlite.org/walformat.html and
https://www.sqlite.org/fileformat2.html#walformat; pages are assigned to tables and indexes with
the ``dbstat`` virtual table on a copy of the database and its WAL taken at the end.

Holding the reader keeps the WAL growing (by about 140 KiB per image message), so the latency of
a run that records is not the latency of a normal one. To end its snapshot in a WAL frame (one
that reads the database file alone would not hold the WAL back), it first writes one row into a
table of its own, ``bench_wal_mark``.
"""

from __future__ import annotations

import collections
import os
import shutil
import sqlite3
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

_WAL_HEADER = 32
_FRAME_HEADER = 24
#: ``mxFrame`` in the wal-index header (``-shm``, native byte order): the last valid frame.
_SHM_MX_FRAME = 16


@dataclass(frozen=True)
class WalWrites:
    """What :meth:`WalRecorder.stop` saw: WAL frames and commits, the page size (bytes), and the
    frames by table or index name, most first."""

    frames: int
    commits: int
    page_size: int
    by: dict[str, int]

    def table(self, count: int, unit: str = "message") -> str:
        """The frames per ``unit`` (``count`` of them were handled) and per commit, and each
        table's or index's share, as text."""
        per = max(count, 1)
        lines = [f"WAL written: {self.frames} frames ({self.frames * self.page_size / 2**20:.1f} MiB) in "
                 f"{self.commits} commits for {count} {unit}s: {self.frames / per:.2f} frames "
                 f"({self.frames * self.page_size / 1024 / per:.1f} KiB) per {unit}, "
                 f"{self.frames / max(self.commits, 1):.1f} per commit"]
        for name, frames in self.by.items():
            lines.append(f"  {name:34} {frames:7} frames  {frames / max(self.frames, 1) * 100:5.1f}%  "
                         f"{frames / per:5.2f} per {unit}")
        return "\n".join(lines)


class WalRecorder:
    """Records the WAL frames written to the SQLite database ``db`` between :meth:`start` and
    :meth:`stop` (by any connection: the daemon's)."""

    def __init__(self, db: Path) -> None:
        self.db = Path(db)
        self._reader: sqlite3.Connection | None = None
        #: The ``-shm`` file, open from before the reader's connection to after it closed:
        #: closing any descriptor of a file drops every POSIX lock this process holds on it,
        #: SQLite's read lock included (fcntl(2)), and the WAL would start over under us.
        self._shm: int | None = None
        self._first = 0

    def _mx_frame(self) -> int:
        assert self._shm is not None
        return int(struct.unpack("=I", os.pread(self._shm, 4, _SHM_MX_FRAME))[0])

    def start(self) -> None:
        """Take and hold a read snapshot; frames after it are recorded."""
        self._shm = os.open(f"{self.db}-shm", os.O_RDONLY)
        self._reader = sqlite3.connect(self.db, isolation_level=None, timeout=10, check_same_thread=False)
        # A snapshot that ends in a WAL frame (a write of ours first): one that reads the database
        # file alone (the WAL all copied back) would not keep SQLite from starting the WAL over.
        self._reader.execute("PRAGMA wal_autocheckpoint=0")
        self._reader.executescript("CREATE TABLE IF NOT EXISTS bench_wal_mark (at REAL);"
                                   " INSERT INTO bench_wal_mark VALUES (julianday('now'));")
        self._reader.execute("BEGIN")
        self._reader.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
        self._first = self._mx_frame()

    def stop(self) -> WalWrites:
        """Release the snapshot; what was written since :meth:`start`. Raises ``RuntimeError``
        when not started."""
        if self._reader is None:
            raise RuntimeError("not started")
        last = self._mx_frame()
        with tempfile.TemporaryDirectory(prefix="wal-pages-") as tmp:
            copy = Path(tmp) / "catalog.db"
            shutil.copyfile(self.db, copy)
            shutil.copyfile(f"{self.db}-wal", f"{copy}-wal")
            self._reader.execute("COMMIT")
            self._reader.close()
            self._reader = None
            if self._shm is not None:
                os.close(self._shm)
                self._shm = None
            pages: collections.Counter[int] = collections.Counter()
            commits = 0
            with open(f"{copy}-wal", "rb") as wal:
                header = wal.read(_WAL_HEADER)
                page_size, salts = struct.unpack(">I", header[8:12])[0], header[16:24]
                for n in range(self._first, last):
                    wal.seek(_WAL_HEADER + n * (_FRAME_HEADER + page_size))
                    frame = wal.read(_FRAME_HEADER)
                    if len(frame) < _FRAME_HEADER or frame[8:16] != salts:
                        break  # not this WAL's frame: the WAL started over (should not happen)
                    page, commit = struct.unpack(">II", frame[:8])
                    pages[page] += 1
                    commits += commit != 0
            conn = sqlite3.connect(copy)
            try:
                owner = dict(conn.execute("SELECT pageno, name FROM dbstat"))
            finally:
                conn.close()
        by: collections.Counter[str] = collections.Counter()
        for page, count in pages.items():
            by[owner.get(page, "(free pages)")] += count
        return WalWrites(sum(pages.values()), commits, page_size, dict(by.most_common()))

