"""Webhook throughput under a burst (issue 12, B1-B3), each figure beside a baseline measured in
the same run, with the load average.

- **B1** acks/s: ``wrk`` (32 connections) posting WAHA text webhooks (unique message ids) to the
  gateway daemon (no bot target), and to :mod:`bench.bare_sqlite_server` (a bare aiohttp server
  doing one SQLite ``INSERT`` + ``COMMIT`` per request, WAL, ``synchronous=FULL``): the ratio.
  Then the gateway's p99 latency at a fixed 500 webhooks/s (an open-loop aiohttp client).
- **B2** text webhooks forwarded end to end: ``wrk`` as fast as the gateway acknowledges, a bot
  sink counting what arrives; acknowledged/s, forwarded/s and the backlog (acknowledged, not yet
  forwarded) every few seconds, then the time to drain it.
- **B3** the same with a 55 KiB JPEG (``tests/fixtures/media/photo.jpg``) per webhook, downloaded
  from the WAHA emulator (its own process) and stored on local disk (fsync) before the forward.

Installs ``wrk`` with ``scripts/system-deps --bench`` (Debian, as root). From the repository root::

    .venv/bin/python -m bench.webhooks                 # B1, B2, B3, 20 s each
    .venv/bin/python -m bench.webhooks --only b1 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import CountingSink, gateway_daemon, loadavg, waha_process
from bench.common import metric as _metric
from tests.conftest import MEDIA, waha_payload
from tests.daemon import REPO, GatewayProcess

PLACEHOLDER = "__MSGID__"


def _body(url: str | None) -> str:
    data = waha_payload(url, message_id=PLACEHOLDER)
    if url is None:
        data["payload"].update(hasMedia=False, media=None, body="hello from the bench")
    return json.dumps(data)


def _lua(tmp: Path, body: str, tag: str) -> Path:
    """A wrk script posting ``body`` with a unique message id per request."""
    prefix, suffix = body.split(PLACEHOLDER)
    script = tmp / f"post-{tag}.lua"
    script.write_text(f"""
local n = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local prefix = [==[{prefix}]==]
local suffix = [==[{suffix}]==]
request = function()
  n = n + 1
  return wrk.format("POST", nil, {{["Content-Type"] = "application/json"}},
                    prefix .. "{tag}-" .. tid .. "-" .. n .. suffix)
end
""")
    return script


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, float]:
    """Run wrk; its requests/s, p99 latency (ms) and non-2xx answers."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rate": rate, "total": total,
            "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "errors": errors.group(1) if errors else ""}  # type: ignore[dict-item]


async def fixed_rate(url: str, body: str, rate: float, seconds: float) -> dict[str, float]:
    """Open loop: ``rate`` webhooks/s for ``seconds``, each on its own task; latency percentiles."""
    latencies: list[float] = []
    failures = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        async def one(i: int) -> None:
            nonlocal failures
            started = time.perf_counter()
            try:
                async with http.post(url, data=body.replace(PLACEHOLDER, f"fixed-{i}"),
                                     headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        failures += 1
                        return
            except aiohttp.ClientError:
                failures += 1
                return
            latencies.append(time.perf_counter() - started)

        tasks = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {"sent": rate * seconds, "failures": failures, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


CODE = REPO
"""The source tree whose daemon runs (``--code``)."""


def _daemon(tmp: Path, name: str, providers: dict[str, object], targets: list[dict[str, object]]) -> GatewayProcess:
    queue: dict[str, object] = {"workers": 4, "max_attempts": 8, "backoff_base": 2.0, "backoff_max": 600.0,
                                "poll_interval": 1.0}
    if CODE == REPO:
        queue["fetch_workers"] = 8
    return gateway_daemon(tmp, name, providers, targets, queue, code=CODE)


async def b1(tmp: Path, seconds: int, connections: int) -> None:
    print(f"\n== B1 webhook acks/s, {connections} connections, {seconds} s each; load {loadavg()}", flush=True)
    body = _body(None)
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_sqlite_server", "--db", str(tmp / "bare.db")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None
        port = int(bare.stdout.readline().split()[1])
        await asyncio.sleep(0.3)
        base = wrk(f"http://127.0.0.1:{port}/webhooks/waha", _lua(tmp, body, "bare"), seconds, connections)
    finally:
        bare.terminate()
        bare.wait()
    print(f"bare aiohttp + INSERT/COMMIT: {base['rate']:.0f}/s, p99 {base['p99_ms']:.1f} ms, "
          f"non-2xx {base['non2xx']}; load {loadavg()}", flush=True)
    gw = _daemon(tmp, "b1", {"waha": {"base_url": "http://127.0.0.1:9", "api_key": "k"}}, [])
    await gw.start()
    try:
        res = wrk(f"{gw.url}/webhooks/waha", _lua(tmp, body, "gw"), seconds, connections)
        commits = await _metric(gw.url, "gateway_catalog_commits_total")
        accepted = await _metric(gw.url, "gateway_webhooks_received_total", 'outcome="accepted"')
        print(f"gateway: {res['rate']:.0f}/s, p99 {res['p99_ms']:.1f} ms, non-2xx {res['non2xx']} "
              f"{res['errors']}; {accepted:.0f} accepted in {commits:.0f} commits "
              f"({accepted / max(commits, 1):.1f} webhooks/commit, job claims and completions included)")
        print(f"B1 ratio gateway / bare: {res['rate'] / base['rate']:.2f} (target >= 1.5); load {loadavg()}",
              flush=True)
        drain_t0 = time.monotonic()
        while await _metric(gw.url, "gateway_jobs", 'state="queued"') > 0 and time.monotonic() - drain_t0 < 300:
            await asyncio.sleep(0.5)
        print(f"(the flood's jobs ran in {time.monotonic() - drain_t0:.1f} s more; the fixed rate starts "
              f"on an empty queue)", flush=True)
        fixed = await fixed_rate(f"{gw.url}/webhooks/waha", body, 500, min(seconds, 10))
        print(f"B1 fixed 500/s for {min(seconds, 10)} s: p50 {fixed['p50_ms']:.1f} ms, p99 {fixed['p99_ms']:.1f} ms "
              f"(target <= 25), failures {fixed['failures']:.0f}; load {loadavg()}", flush=True)
    finally:
        await gw.terminate()


async def _end_to_end(tmp: Path, name: str, seconds: int, connections: int, url: str | None,
                      providers: dict[str, object], target: float) -> None:
    sink = CountingSink()
    runner = await sink.start()
    gw = _daemon(tmp, name, providers, [{"name": "bot", "url": sink.url}])
    await gw.start()
    try:
        script = _lua(tmp, _body(url), name)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        run = loop.run_in_executor(None, wrk, f"{gw.url}/webhooks/waha", script, seconds, connections)
        samples = []
        while not run.done():
            await asyncio.sleep(min(4.0, seconds / 5))
            accepted = await _metric(gw.url, "gateway_webhooks_received_total", 'outcome="accepted"')
            samples.append((time.monotonic() - t0, accepted, sink.count))
        res = await run
        window = time.monotonic() - t0
        accepted = await _metric(gw.url, "gateway_webhooks_received_total", 'outcome="accepted"')
        forwarded_in_window = sink.count
        drain_t0 = time.monotonic()
        while sink.count < accepted and time.monotonic() - drain_t0 < 600:
            await asyncio.sleep(0.2)
        drain = time.monotonic() - drain_t0
        dead = await _metric(gw.url, "gateway_jobs", 'state="dead"')
        series = ", ".join(f"{t:.0f}s: {a - f:.0f}" for t, a, f in samples)
        print(f"acknowledged {res['rate']:.0f}/s (wrk, p99 {res['p99_ms']:.1f} ms, non-2xx {res['non2xx']}); "
              f"forwarded {forwarded_in_window / window:.0f}/s during the {window:.0f} s window; "
              f"backlog (acknowledged - forwarded) {series}; drained {accepted - forwarded_in_window:.0f} "
              f"more in {drain:.1f} s; forwarded {sink.count} of {accepted:.0f}; dead jobs {dead:.0f}")
        sustained = sink.count / (window + drain)
        print(f"{name.upper()} forwarded end to end {sustained:.0f}/s over {window + drain:.0f} s "
              f"(target >= {target:.0f}/s); load {loadavg()}", flush=True)
    finally:
        await gw.terminate()
        await runner.cleanup()


async def b2(tmp: Path, seconds: int, connections: int) -> None:
    print(f"\n== B2 text webhooks forwarded end to end, {seconds} s; load {loadavg()}", flush=True)
    await _end_to_end(tmp, "b2", seconds, connections, None,
                      {"waha": {"base_url": "http://127.0.0.1:9", "api_key": "k"}}, 1000)


async def b3(tmp: Path, seconds: int, connections: int) -> None:
    print(f"\n== B3 55 KiB image webhooks stored (local, fsync) and forwarded, {seconds} s; load {loadavg()}",
          flush=True)
    files = tmp / "waha-files"
    files.mkdir()
    shutil.copy(MEDIA / "photo.jpg", files / "photo.jpg")
    async with waha_process(files) as base_url:
        await _end_to_end(tmp, "b3", seconds, connections, f"{base_url}/api/files/default/photo.jpg",
                          {"waha": {"base_url": base_url, "api_key": "waha-key"}}, 300)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["b1", "b2", "b3"], action="append")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="run the daemon of this source tree (e.g. an earlier commit from git archive)")
    args = parser.parse_args()
    global CODE
    CODE = args.code.resolve()
    print(f"daemon from {CODE}", flush=True)
    if not shutil.which("wrk"):
        subprocess.run([str(REPO / "scripts" / "system-deps"), "--bench"], check=True)
    nproc = len(__import__("os").sched_getaffinity(0))
    print(f"{nproc} cores; load average {loadavg()}; wrk {args.connections} connections, 2 threads", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-webhooks-"))
    try:
        for name in args.only or ["b1", "b2", "b3"]:
            await {"b1": b1, "b2": b2, "b3": b3}[name](tmp, args.seconds, args.connections)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
