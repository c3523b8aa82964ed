"""What the burst benchmarks (``bench/webhooks.py``, ``bench/latency.py``, ``bench/burst.py``) share: the load
average, free ports, the gateway daemon as a subprocess, the WAHA emulator in its own process, a
bot sink in the bench process, an open-loop webhook sender and percentiles.

The WAHA emulator child (``python -m bench.harness waha --file F --aliases N``) is
:class:`tests.emulators.waha.WahaEmulator` serving one file under ``N`` names ``m0.jpg`` ...
(each a distinct URL, hence a distinct attachment for the gateway, which stores an attachment
once per URL), and stamping when each file request arrived (``GET /bench/arrivals``:
``{name: epoch seconds}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import base_config, deep_merge
from tests.daemon import REPO, GatewayProcess, write_toml


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p`` quantile (0-1) of ``values`` (nearest rank, no interpolation); NaN when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def gateway_daemon(tmp: Path, name: str, providers: dict[str, object], targets: list[dict[str, object]],
                   code: Path = REPO, overrides: dict[str, Any] | None = None) -> GatewayProcess:
    """A daemon (not started) in ``tmp/name`` with local storage (fsync), the SQLite catalog, log
    level WARNING, the code's default lanes (``workers``, ``fetch_workers``),
    running the source tree ``code``; ``overrides``: settings merged over these
    (``{"storage": {"local": {"fsync": False}}}``)."""
    port = free_port()
    work = tmp / name
    work.mkdir()
    queue: dict[str, object] = {"max_attempts": 8, "backoff_base": 2.0, "backoff_max": 600.0,
                                "poll_interval": 1.0}
    data = deep_merge(base_config(work, port, None, None),
                      {"queue": queue, "log": {"level": "WARNING"}, "providers": providers})
    data["queue"].pop("workers", None)  # the tests' 4: the code's default instead
    data = deep_merge(data, overrides or {})
    data["targets"] = targets
    return GatewayProcess(write_toml(work / "gateway.toml", data), port, work / "daemon.log", cwd=code)


async def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of the samples of Prometheus metric ``name`` at ``{url}/metrics`` whose line
    contains ``labels`` (e.g. ``'outcome="accepted"'``)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


class CountingSink:
    """A minimal bot target in the bench process: answers 200 and counts. ``key``: when given,
    ``arrivals[key(body)]`` is set to the epoch time each POST arrived (headers and body read);
    ``inspect``: when given, gets each body."""

    def __init__(self, key: Callable[[bytes], str] | None = None,
                 inspect: Callable[[bytes], None] | None = None) -> None:
        self.count = 0
        self.key = key
        self.inspect = inspect
        self.arrivals: dict[str, float] = {}
        self.app = web.Application(client_max_size=16 * 1024 * 1024)
        self.app.router.add_post("/{tail:.*}", self._receive)
        self.url = ""

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.key is not None:
            self.arrivals[self.key(body)] = time.time()
        self.count += 1
        if self.inspect is not None:
            self.inspect(body)
        return web.Response(text="ok")

    async def start(self) -> web.AppRunner:
        """Listen on 127.0.0.1 (a free port); :attr:`url` is then ``http://127.0.0.1:<port>/hook``."""
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"
        return runner


@dataclass
class Sent:
    """One webhook of :func:`open_loop`: epoch seconds when it was sent and answered, its status
    (0: no answer, a connection error)."""

    index: int
    sent: float
    answered: float = float("nan")
    status: int = 0


async def open_loop(url: str, body: Callable[[int], str], rate: float, seconds: float) -> list[Sent]:
    """POST ``body(i)`` (JSON) to ``url`` at a fixed ``rate`` per second for ``seconds``, each on
    its own task whatever the earlier ones are doing (an open loop: a slow server gets no
    respite); return each webhook's :class:`Sent`."""
    results: list[Sent] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        async def one(i: int) -> None:
            data = body(i)
            record = Sent(i, time.time())
            results.append(record)
            try:
                async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    record.status = r.status
            except aiohttp.ClientError:
                pass
            record.answered = time.time()

        tasks = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda s: s.index)


@asynccontextmanager
async def waha_process(files: Path, *args: str) -> AsyncIterator[str]:
    """The WAHA emulator (``python -m tests.emulators.waha``) in its own process serving the files
    of ``files``, with more command-line ``args``; yields its base URL (API key ``waha-key``)."""
    port = free_port()
    emu = subprocess.Popen([sys.executable, "-m", "tests.emulators.waha", "--port", str(port), "--dir", str(files),
                            *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert emu.stdout is not None
        emu.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        emu.terminate()
        emu.wait()



class WahaProcess:
    """The WAHA emulator in its own process (see the module's docstring): ``file`` served as
    ``{base_url}/api/files/default/m<i>.jpg`` for ``i`` below ``aliases``, with ``api_key``."""

    def __init__(self, file: Path, aliases: int, api_key: str = "waha-key"):
        self.file = file
        self.aliases = aliases
        self.api_key = api_key
        self.base_url = ""
        self.proc: subprocess.Popen[str] | None = None

    def url(self, i: int) -> str:
        """The URL of alias ``i``."""
        return f"{self.base_url}/api/files/default/m{i}.jpg"

    def __enter__(self) -> WahaProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.harness", "waha", "--file", str(self.file), "--aliases",
             str(self.aliases), "--api-key", self.api_key], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.base_url = f"http://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait()

    async def arrivals(self) -> dict[int, float]:
        """``{alias: epoch seconds}`` of the first request for each alias so far."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.base_url}/bench/arrivals") as r:
            stamps: dict[str, float] = await r.json()
        return {int(name[1:].split(".")[0]): t for name, t in stamps.items()}


def _waha_main(argv: list[str]) -> None:
    from tests.emulators.waha import WahaEmulator

    parser = argparse.ArgumentParser(prog="bench.harness waha")
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--aliases", type=int, required=True)
    parser.add_argument("--api-key", default="waha-key")
    args = parser.parse_args(argv)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    emu = WahaEmulator(api_key=args.api_key, lifetime=float("inf"))
    emu.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for i in range(args.aliases):
        emu.add_file(args.file, name=f"m{i}.jpg", copy=False)
    arrivals: dict[str, float] = {}

    @web.middleware
    async def stamp(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        name = request.match_info.get("file")
        if name is not None:
            arrivals.setdefault(name, time.time())
            emu.requests.clear()  # the emulator keeps every request's headers; nobody reads them here
        return await handler(request)

    async def show(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(arrivals), content_type="application/json")

    emu.app.middlewares.append(stamp)
    emu.app.router.add_get("/bench/arrivals", show)
    print(f"port {sock.getsockname()[1]}", flush=True)
    web.run_app(emu.app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    if sys.argv[1:2] == ["waha"]:
        _waha_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.harness waha --file F --aliases N [--api-key K]")
