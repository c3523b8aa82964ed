"""What the webhook benchmarks share (``bench.webhooks`` B1-B3, ``bench.burst`` B4): the load
average, free ports, a counting bot sink, a /metrics reader, the gateway daemon under test and the
WAHA emulator in its own process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import base_config, deep_merge
from tests.daemon import REPO, GatewayProcess, write_toml


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingSink:
    """A minimal bot target: answers 200 and counts; ``inspect`` (if given) gets each body."""

    def __init__(self, inspect: Callable[[bytes], None] | None = None) -> None:
        self.count = 0
        self.inspect = inspect
        self.app = web.Application(client_max_size=16 * 1024 * 1024)
        self.app.router.add_post("/{tail:.*}", self._receive)
        self.url = ""

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.count += 1
        if self.inspect is not None:
            self.inspect(body)
        return web.Response(text="ok")

    async def start(self) -> web.AppRunner:
        """Listen on a free port of 127.0.0.1 (``url`` is set); clean the runner up when done."""
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"
        return runner


async def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of the samples of metric ``name`` at ``{url}/metrics`` whose line contains ``labels``."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def gateway_daemon(tmp: Path, name: str, providers: dict[str, object], targets: list[dict[str, object]],
                   queue: dict[str, object], code: Path = REPO, log_level: str = "WARNING") -> GatewayProcess:
    """The daemon of source tree ``code`` in ``tmp/name`` (local storage with fsync, the tests'
    base settings) with these ``[providers]``, ``[[targets]]`` and ``[queue]``; not started yet."""
    port = free_port()
    work = tmp / name
    work.mkdir()
    data = deep_merge(base_config(work, port, None, None),
                      {"queue": queue, "log": {"level": log_level}, "providers": providers})
    data["targets"] = targets
    return GatewayProcess(write_toml(work / "gateway.toml", data), port, work / "daemon.log", cwd=code)


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
