"""Benchmark: stream one large WAHA attachment through the gateway daemon, and compare.

What is measured, all on 127.0.0.1 in one run:

1. A file of ``--size-mib`` MiB (default 1024) of random bytes is generated in a temp directory,
   chunk by chunk (never whole in memory), its SHA-256 computed while writing, and fsynced so
   that its write-back does not overlap the measurements. It starts with an MP4 ``ftyp`` box so
   that libmagic agrees with the declared ``video/mp4``.
2. The WAHA emulator (``tests/emulators/waha.py``, serving with ``web.FileResponse``, i.e.
   sendfile) and the bot sink (``tests/emulators/sink.py``) run as aiohttp servers inside this
   process.
3. Baselines: the same URL downloaded to disk by a *separate* Python process with aiohttp
   (``iter_chunked`` + ``write``), once plain and once also hashing (SHA-256) and fsyncing, which
   is the minimum work the gateway must do; and by ``curl`` when it is on PATH. A separate process
   is used so that, like the daemon, the client does not share this process's event loop (and
   CPU) with the emulator.
4. The gateway daemon runs as a subprocess (``python -m gateway serve --config ...``) with local
   storage (fsync on) in the temp directory. One WAHA ``message`` webhook referencing the file is
   posted; the clock starts when the webhook is answered 200 and stops when the sink has received
   the forwarded message, whose ``payload.media.gateway.sha256``/``size`` must match the file.
   Throughput is size / elapsed. The catalog is read afterwards to split the time into phases.
   ``--repeat`` (default 3) webhooks with distinct message ids are sent one after the other (each
   stores a new object, deleted after it is checked, except the last), and each baseline runs as
   many times; the summary gives medians.
5. While it works the daemon's ``VmRSS`` is sampled from ``/proc/<pid>/status`` every 50 ms; its
   ``VmHWM`` (peak RSS, authoritative) is read before it is stopped with SIGTERM (it must exit 0).

The run fails (exit status 1) when the peak RSS reaches the limit (150 MB by default), the digest
or size of the stored object is wrong, or the daemon does not exit 0.

Run from the repository root::

    .venv/bin/python -m bench.stream_1gib                 # 1 GiB
    .venv/bin/python -m bench.stream_1gib --size-mib 256 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the emulators live in tests/, which is not installed
    sys.path.insert(0, str(REPO))

from tests.emulators.sink import BotSink  # noqa: E402
from tests.emulators.waha import WahaEmulator  # noqa: E402

MiB = 1024 * 1024
MB = 1000 * 1000
GEN_BLOCK = 4 * MiB
CLIENT_CHUNK = 256 * 1024  # the same read size as the WAHA plugin's FETCH_CHUNK
RSS_SAMPLE_INTERVAL = 0.05
DELIVERY_TIMEOUT = 600.0
API_KEY = "bench-waha-key"
# An MP4 "ftyp" box: libmagic sniffs video/mp4, so the declared type is not a mismatch.
MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"


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


async def start_server(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on 127.0.0.1, a free port; return the runner and the base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a valid TOML basic string for these values
    raise TypeError(type(value))


def write_config(path: Path, *, port: int, workdir: Path, waha_url: str, sink_url: str,
                 max_bytes: int) -> Path:
    """Write the daemon's ``gateway.toml`` (everything under ``workdir``) to ``path``."""
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 10},
        "catalog": {"path": str(workdir / "var" / "gateway.db")},
        "media": {"max_bytes": max_bytes, "fetch_timeout": 3600, "link_secret": "bench-link-secret"},
        "storage": {"backend": "local"},
        "storage.local": {"root": str(workdir / "var" / "media"), "fsync": True},
        "log": {"level": "WARNING", "format": "json"},
        "providers.waha": {"base_url": waha_url, "api_key": API_KEY},
    }
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
        lines.append("")
    lines += ["[[targets]]", 'name = "bench"', f"url = {_toml(sink_url)}", "timeout = 60", ""]
    path.write_text("\n".join(lines))
    tomllib.loads(path.read_text())  # fail here rather than in the daemon
    return path


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


class Daemon:
    """The gateway as a subprocess; its stderr/stdout go to ``log_path``."""

    def __init__(self, config: Path, port: int, log_path: Path):
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        """Start ``python -m gateway serve`` and wait until ``GET /healthz`` answers 200."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
                cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise BenchError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise BenchError(f"daemon did not answer /healthz within {timeout}s:\n{self.log_tail()}")

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, return the exit status (SIGKILL and raise if it does not stop)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise BenchError(f"daemon ignored SIGTERM for {timeout}s:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the daemon's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


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


def stored_object(workdir: Path, event_id: str) -> Path | None:
    """The file local storage wrote for ``event_id``'s media (from the catalog), or None."""
    conn = sqlite3.connect(f"file:{workdir / 'var' / 'gateway.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT key FROM media WHERE event_id=?", (event_id,)).fetchone()
    finally:
        conn.close()
    return workdir / "var" / "media" / row[0] if row else None


async def wait_phases(db_path: Path, event_id: str, timeout: float = 10.0) -> dict[str, float]:
    """:func:`catalog_phases` once the ``deliver`` job is marked done (the sink sees the POST a
    moment before the daemon commits that), or whatever is there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        phases = await asyncio.to_thread(catalog_phases, db_path, event_id)
        if "deliver_done" in phases or time.monotonic() > deadline:
            return phases
        await asyncio.sleep(0.05)


# -- the run -------------------------------------------------------------------------------
@dataclass
class GatewayRun:
    """One webhook's trip: seconds from the 200 answer to the sink's delivery, and the phases."""

    seconds: float
    webhook_ms: float
    phases: dict[str, float]


@dataclass
class Result:
    """Everything the summary prints. Times are seconds, sizes bytes."""

    size: int
    sha256: str
    aiohttp_plain: list[float] = field(default_factory=list)
    aiohttp_full: list[float] = field(default_factory=list)
    curl: list[float] = field(default_factory=list)
    gateway: list[GatewayRun] = field(default_factory=list)
    rss_idle: int = 0
    rss_sampled_max: int = 0
    rss_hwm: int = 0
    samples: int = 0
    daemon_rc: int | None = None
    daemon_log: list[str] = field(default_factory=list)
    digest_ok: bool = False
    problems: list[str] = field(default_factory=list)


async def run_baselines(res: Result, url: str, workdir: Path, repeat: int,
                        say: Callable[[str], None]) -> None:
    """Download ``url`` ``repeat`` times with each client; record the seconds in ``res``."""
    out = workdir / "baseline.bin"
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


async def run_gateway(res: Result, waha_url: str, url: str, sink: BotSink, sink_url: str,
                      workdir: Path, repeat: int, say: Callable[[str], None]) -> None:
    """Start the daemon, push ``repeat`` webhooks through it one after the other, measure each
    and the daemon's memory, check every forwarded digest, stop the daemon."""
    port = free_port()
    config = write_config(workdir / "gateway.toml", port=port, workdir=workdir,
                          waha_url=waha_url, sink_url=sink_url,
                          max_bytes=res.size + MiB)
    db_path = workdir / "var" / "gateway.db"
    daemon = Daemon(config, port, workdir / "daemon.log")
    say(f"starting the daemon on {daemon.url} ...")
    try:
        await daemon.start()
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
                event_id = answer["event_ids"][0]
                payload = (deliveries[i].json or {}).get("payload") or {}
                gw = (payload.get("media") or {}).get("gateway") or {}
                if gw.get("sha256") != res.sha256 or gw.get("size") != res.size:
                    res.digest_ok = False
                    res.problems.append(f"run {i + 1}: forwarded sha256={gw.get('sha256')} "
                                        f"size={gw.get('size')}, expected {res.sha256} {res.size}")
                try:
                    phases = await wait_phases(db_path, event_id)
                except sqlite3.Error as exc:
                    phases = {}
                    res.problems.append(f"run {i + 1}: could not read the catalog: {exc}")
                res.gateway.append(GatewayRun(seconds, (t_start - t_post) * 1000, phases))
                obj = await asyncio.to_thread(stored_object, workdir, event_id)
                on_disk = obj.stat().st_size if obj is not None and obj.exists() else None
                if on_disk != res.size:
                    res.digest_ok = False
                    res.problems.append(f"run {i + 1}: stored object {obj} has {on_disk} bytes")
                elif i < repeat - 1:
                    # Like the baselines' copies: freed pages are reused by the next run, so every
                    # run writes into the same kind of memory (see bench/README.md).
                    await asyncio.to_thread(obj.unlink)
        await sampler.stop()
        res.samples = len(sampler.samples)
        res.rss_sampled_max = sampler.max_rss
        res.rss_hwm = proc_status(daemon.pid).get("VmHWM", 0)
        say("stopping the daemon (SIGTERM) ...")
        res.daemon_rc = await daemon.terminate()
        res.daemon_log = daemon.log_path.read_text(errors="replace").splitlines()
        if res.daemon_rc != 0:
            res.problems.append(f"daemon exited with {res.daemon_rc} after SIGTERM:\n{daemon.log_tail()}")
    finally:
        if daemon.proc is not None and daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()


async def run(args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> Result:
    """Generate the file, run the baselines and the gateway; return the measurements."""
    size = args.size_mib * MiB
    src = workdir / "big.bin"
    say(f"generating {args.size_mib} MiB at {src} ...")
    t = time.perf_counter()
    sha = await asyncio.to_thread(generate_file, src, size)
    say(f"  done in {time.perf_counter() - t:.1f}s, sha256 {sha}")
    res = Result(size=size, sha256=sha)

    emu = WahaEmulator(api_key=API_KEY, lifetime=float("inf"), workdir=workdir / "waha-files")
    sink = BotSink()
    runners: list[web.AppRunner] = []
    try:
        runner, emu.base_url = await start_server(emu.app)
        runners.append(runner)
        runner, sink_base = await start_server(sink.app)
        runners.append(runner)
        url = emu.add_file(src, copy=False)
        await run_baselines(res, url, workdir, args.repeat, say)
        await run_gateway(res, emu.base_url, url, sink, f"{sink_base}/hook", workdir, args.repeat, say)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    return res


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


def summary(res: Result, limit_mb: float) -> list[str]:
    """The printed summary, one string per line. Rates are medians over the runs."""
    size = res.size
    lines = [f"file: {size // MiB} MiB ({size} bytes), sha256 {res.sha256}"]
    base = statistics.median(res.aiohttp_plain) if res.aiohttp_plain else None
    if res.aiohttp_plain:
        curl = f"; curl: {_rate(size, res.curl)}" if res.curl else "; curl: not on PATH"
        lines.append(f"baseline aiohttp download: {_rate(size, res.aiohttp_plain)}{curl}")
    if res.aiohttp_full:
        lines.append(f"baseline aiohttp download + sha256 + fsync: {_rate(size, res.aiohttp_full)}")
    if res.gateway:
        g = statistics.median(r.seconds for r in res.gateway)
        ratio = f"{base / g:.2f}" if base else "n/a"
        full = (f", vs +sha256+fsync: {statistics.median(res.aiohttp_full) / g:.2f}"
                if res.aiohttp_full else "")
        lines.append(f"gateway webhook->stored->forwarded: {_rate(size, [r.seconds for r in res.gateway])}"
                     f"  ratio vs aiohttp baseline: {ratio}{full}")
        for i, r in enumerate(res.gateway, 1):
            p = r.phases
            parts = [f"run {i}: {r.seconds:.2f} s, webhook answered in {r.webhook_ms:.0f} ms"]
            if {"received", "stored"} <= p.keys():
                parts.append(f"received->stored (fetch+hash+write+fsync+rename) {p['stored'] - p['received']:.2f} s")
            if {"stored", "ingest_done"} <= p.keys():
                parts.append(f"stored->ingest done {(p['ingest_done'] - p['stored']) * 1000:.0f} ms")
            if {"ingest_done", "deliver_done"} <= p.keys():
                parts.append(f"ingest done->delivered {(p['deliver_done'] - p['ingest_done']) * 1000:.0f} ms")
            lines.append("  " + "; ".join(parts))
    verdict = "PASS" if res.rss_hwm and peak_rss(res) < limit_mb * MB else "FAIL"
    lines.append(f"daemon RSS idle: {res.rss_idle / MB:.1f} MB, peak (VmHWM): {res.rss_hwm / MB:.1f} MB "
                 f"(max sampled VmRSS {res.rss_sampled_max / MB:.1f} MB, {res.samples} samples)   "
                 f"limit {limit_mb:.0f} MB: {verdict}")
    lines.append(f"digest and size of the forwarded media: {'OK' if res.digest_ok else 'WRONG'}; "
                 f"daemon exit status after SIGTERM: {res.daemon_rc}")
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
    parser.add_argument("--rss-limit-mb", type=float, default=150.0,
                        help="fail when the daemon's peak RSS reaches this (MB, default 150)")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temp directory")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        parser.error("--size-mib and --repeat must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-", dir=args.tmp))

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    failed = True
    try:
        res = asyncio.run(run(args, workdir, say))
        print("\n".join(summary(res, args.rss_limit_mb)), flush=True)
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
