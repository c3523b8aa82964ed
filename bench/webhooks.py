"""Webhook throughput under a burst (issue 12, B1-B3), each figure beside a baseline measured in
the same run, with the load average.

- **B1** acks/s: ``wrk`` (32 connections) posting WAHA text webhooks (unique message ids) to the
  gateway daemon (no bot target), and to :mod:`bench.bare_sqlite_server` (a bare aiohttp server
  doing one SQLite ``INSERT`` + ``COMMIT`` per request, WAL, ``synchronous=FULL``), in turn, in
  ``--slices`` alternating slices (default 3) of ``--seconds`` / slices each: the ratio of the
  summed rates, and each slice's.
  Then the gateway's p99 latency at a fixed 500 webhooks/s (an open-loop aiohttp client).
- **B2** text webhooks forwarded end to end: ``wrk`` as fast as the gateway acknowledges, a bot
  sink counting what arrives; acknowledged/s, forwarded/s and the backlog (acknowledged, not yet
  forwarded) every few seconds, then the time to drain it.
- **B3** the same with a 55 KiB JPEG (``tests/fixtures/media/photo.jpg``) per webhook, downloaded
  from the WAHA emulator (its own process) and stored on local disk (fsync) before the forward.

B2 and B3 also print the daemon's CPU time (user + system, ``/proc/<pid>/stat``) per forwarded
message, and its event loop's share: far less sensitive to a shared machine's load than the rates.

Installs ``wrk`` with ``scripts/system-deps --bench`` (Debian, as root). From the repository root::

    .venv/bin/python -m bench.webhooks                 # B1, B2, B3, 20 s each
    .venv/bin/python -m bench.webhooks --only b1 --seconds 10
    .venv/bin/python -m bench.webhooks --only b1 --wal-pages   # what the gateway's commits write, by table and index
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

from bench.harness import (
    CountingSink,
    WahaProcess,
    gateway_daemon,
    loadavg,
    metric,
    open_loop,
    percentile,
)
from bench.stream_1gib import cpu_seconds
from bench.wal_pages import WalRecorder
from tests.conftest import MEDIA, waha_payload
from tests.daemon import REPO, GatewayProcess

PLACEHOLDER = "__MSGID__"
NUMBER = "__N__"
"""In a media URL: the webhook's number, so that each webhook has an attachment of its own."""


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


async def fixed_rate(url: str, body: str, rate: float, seconds: float, tag: str = "fixed") -> dict[str, float]:
    """Open loop: ``rate`` webhooks/s for ``seconds``, each on its own task; latency percentiles."""
    sent = await open_loop(url, lambda i: body.replace(PLACEHOLDER, f"{tag}-{i}").replace(NUMBER, str(i)),
                           rate, seconds)
    latencies = [(s.answered - s.sent) * 1000 for s in sent if s.status == 200]
    return {"sent": rate * seconds, "failures": len(sent) - len(latencies),
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "seconds": max((s.answered for s in sent), default=0.0) - min((s.sent for s in sent), default=0.0)}


def fixed_rate_process(url: str, body: str, rate: float, seconds: float, tag: str) -> subprocess.Popen[str]:
    """:func:`fixed_rate` in a process of its own (``--send``), so that the sender's CPU is not the
    bench process's (which runs the bot sink); it prints its result as one JSON line."""
    return subprocess.Popen([sys.executable, "-m", "bench.webhooks", "--send", url, "--rate", str(rate),
                             "--seconds", str(seconds), "--tag", tag, "--body", body],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


CODE = REPO
"""The source tree whose daemon runs (``--code``)."""


def _daemon(tmp: Path, name: str, providers: dict[str, object], targets: list[dict[str, object]]) -> GatewayProcess:
    return gateway_daemon(tmp, name, providers, targets, code=CODE)


async def b1(tmp: Path, seconds: int, connections: int, slices: int = 3, wal_pages: bool = False) -> None:
    """B1: ``wrk`` on the bare server and on the gateway in turn, ``slices`` times each
    (``seconds`` in all for each, split evenly), so that both meet the same moments of a shared
    machine; each rate is its requests over its seconds, summed over its slices. Every slice
    posts message ids of its own (the gateway would drop a repeated one as a duplicate)."""
    per = max(1, round(seconds / slices))
    print(f"\n== B1 webhook acks/s, {connections} connections, {slices} alternating slices of {per} s each; "
          f"load {loadavg()}", flush=True)
    body = _body(None)
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_sqlite_server", "--db", str(tmp / "bare.db")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    gw = _daemon(tmp, "b1", {"waha": {"base_url": "http://127.0.0.1:9", "api_key": "k"}}, [])
    try:
        await _b1_slices(tmp, seconds, connections, slices, per, body, bare, gw, wal_pages)
    finally:
        await gw.terminate()


async def _b1_slices(tmp: Path, seconds: int, connections: int, slices: int, per: int, body: str,
                     bare: subprocess.Popen[str], gw: GatewayProcess, wal_pages: bool = False) -> None:
    """:func:`b1`'s runs once both servers are started: the alternating slices (the bare server
    stops after them), then the fixed rate on the gateway. ``wal_pages``: the WAL frames the
    gateway's catalog wrote during the slices, by table and index (:mod:`bench.wal_pages`)."""
    try:
        assert bare.stdout is not None
        port = int(bare.stdout.readline().split()[1])
        await gw.start()
        await asyncio.sleep(0.3)
        recorder = WalRecorder(gw.config.parent / "var" / "gateway.db") if wal_pages else None
        if recorder is not None:
            recorder.start()
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "gw": []}
        for i in range(slices):
            for name, url in (("bare", f"http://127.0.0.1:{port}/webhooks/waha"), ("gw", f"{gw.url}/webhooks/waha")):
                runs[name].append(wrk(url, _lua(tmp, body, f"{name}{i}"), per, connections))
            print(f"  slice {i + 1}/{slices}: bare {runs['bare'][-1]['rate']:.0f}/s, "
                  f"gateway {runs['gw'][-1]['rate']:.0f}/s; load {loadavg()}", flush=True)
        base, res = (_summed(runs[name]) for name in ("bare", "gw"))
        print(f"bare aiohttp + INSERT/COMMIT: {base['rate']:.0f}/s, p99 {base['p99_ms']:.1f} ms (worst slice), "
              f"non-2xx {base['non2xx']:.0f}", flush=True)
        commits = await metric(gw.url, "gateway_catalog_commits_total")
        accepted = await metric(gw.url, "gateway_webhooks_received_total", 'outcome="accepted"')
        print(f"gateway: {res['rate']:.0f}/s, p99 {res['p99_ms']:.1f} ms (worst slice), non-2xx {res['non2xx']:.0f} "
              f"{res['errors']}; {accepted:.0f} accepted in {commits:.0f} commits "
              f"({accepted / max(commits, 1):.1f} webhooks/commit, job claims and completions included)")
        by_slice = ", ".join(f"{g['rate'] / b['rate']:.2f}" for b, g in zip(runs["bare"], runs["gw"]))
        print(f"B1 ratio gateway / bare: {res['rate'] / base['rate']:.2f} (target >= 1.5; by slice: {by_slice}); "
              f"load {loadavg()}", flush=True)
        if recorder is not None:
            print("the gateway's catalog writes during its slices:")
            print((await asyncio.to_thread(recorder.stop)).table(int(accepted), "webhook"))
    finally:
        bare.terminate()
        bare.wait()
    drain_t0 = time.monotonic()
    while await metric(gw.url, "gateway_jobs", 'state="queued"') > 0 and time.monotonic() - drain_t0 < 300:
        await asyncio.sleep(0.5)
    print(f"(the flood's jobs ran in {time.monotonic() - drain_t0:.1f} s more; the fixed rate starts "
          f"on an empty queue)", flush=True)
    fixed = await fixed_rate(f"{gw.url}/webhooks/waha", body, 500, min(seconds, 10))
    print(f"B1 fixed 500/s for {min(seconds, 10)} s: p50 {fixed['p50_ms']:.1f} ms, p99 {fixed['p99_ms']:.1f} ms "
          f"(target <= 25), failures {fixed['failures']:.0f}; load {loadavg()}", flush=True)


def _summed(runs: list[dict[str, float]]) -> dict[str, float]:
    """The slices of one side of B1 as one run: its requests over its seconds (each slice's as
    ``wrk`` timed it), the worst slice's p99, the non-2xx answers and socket errors of all."""
    return {"rate": sum(r["total"] for r in runs) / sum(r["total"] / r["rate"] for r in runs),
            "p99_ms": max(r["p99_ms"] for r in runs), "non2xx": sum(r["non2xx"] for r in runs),
            "errors": "; ".join(str(r["errors"]) for r in runs if r["errors"])}  # type: ignore[dict-item]


async def _end_to_end(tmp: Path, name: str, seconds: int, url: str | None,
                      providers: dict[str, object], rate: float) -> None:
    """Webhooks at a fixed ``rate`` for ``seconds`` (open loop, :func:`fixed_rate_process`), a
    counting bot sink; the backlog (acknowledged - forwarded) every few seconds, the forwarding
    rate during the window, then the time to forward the rest."""
    sink = CountingSink()
    runner = await sink.start()
    gw = _daemon(tmp, name, providers, [{"name": "bot", "url": sink.url}])
    await gw.start()
    try:
        cpu0, loop0 = cpu_seconds(gw.pid), cpu_seconds(gw.pid, gw.pid)
        t0 = time.monotonic()
        sender = fixed_rate_process(f"{gw.url}/webhooks/waha", _body(url), rate, seconds, name)
        samples = []
        next_sample = t0 + min(3.0, seconds / 6)
        while sender.poll() is None:  # the window ends when the sender does (checked every 50 ms)
            await asyncio.sleep(0.05)
            if time.monotonic() >= next_sample:
                accepted = await metric(gw.url, "gateway_webhooks_received_total", 'outcome="accepted"')
                samples.append((time.monotonic() - t0, accepted, sink.count))
                next_sample += min(3.0, seconds / 6)
        assert sender.stdout is not None
        res = json.loads(sender.stdout.read().strip().splitlines()[-1])
        window = time.monotonic() - t0
        accepted = await metric(gw.url, "gateway_webhooks_received_total", 'outcome="accepted"')
        forwarded_in_window = sink.count
        drain_t0 = time.monotonic()
        while sink.count < accepted and time.monotonic() - drain_t0 < 600:
            await asyncio.sleep(0.1)
        drain = time.monotonic() - drain_t0
        cpu, loop_cpu = cpu_seconds(gw.pid) - cpu0, cpu_seconds(gw.pid, gw.pid) - loop0
        dead = await metric(gw.url, "gateway_jobs", 'state="dead"')
        series = ", ".join(f"{t:.0f}s: {a - f:.0f}" for t, a, f in samples)
        half = [(t, a - f) for t, a, f in samples[len(samples) // 2:]]
        growth = (half[-1][1] - half[0][1]) / max(half[-1][0] - half[0][0], 1e-9) if len(half) > 1 else 0.0
        flat = growth <= 0.05 * rate  # over the second half, the backlog grows by under 5 % of the rate
        print(f"offered {rate:.0f}/s for {seconds} s: {accepted:.0f} acknowledged (sender failures "
              f"{res['failures']:.0f}, ack p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms); backlog "
              f"(acknowledged - forwarded) {series}; {accepted - forwarded_in_window:.0f} left at the end, "
              f"forwarded in {drain:.1f} s more; forwarded {sink.count} of {accepted:.0f}; dead jobs {dead:.0f}")
        forwarded_rate = forwarded_in_window / window
        kept_up = flat and forwarded_rate >= 0.95 * rate
        print(f"{name.upper()} forwarded {forwarded_rate:.0f}/s during the {window:.0f} s window "
              f"(offered {rate:.0f}/s; backlog {'flat' if flat else 'GROWING'}, {growth:+.0f}/s over the second half; "
              f"{'kept up' if kept_up else 'did NOT keep up'}); load {loadavg()}", flush=True)
        print(f"{name.upper()} daemon CPU {cpu * 1000 / max(sink.count, 1):.2f} ms per forwarded message (event loop "
              f"{loop_cpu * 1000 / max(sink.count, 1):.2f} ms; user + system, /proc/<pid>/stat, from the first "
              f"webhook to the last forward)", flush=True)
    finally:
        await gw.terminate()
        await runner.cleanup()


async def b2(tmp: Path, seconds: int, connections: int, rate: float = 1000) -> None:
    print(f"\n== B2 text webhooks forwarded end to end, {rate:.0f}/s for {seconds} s; load {loadavg()}", flush=True)
    await _end_to_end(tmp, "b2", seconds, None,
                      {"waha": {"base_url": "http://127.0.0.1:9", "api_key": "k"}}, rate)


async def b3(tmp: Path, seconds: int, connections: int, rate: float = 300) -> None:
    print(f"\n== B3 55 KiB image webhooks stored (local, fsync) and forwarded, {rate:.0f}/s for {seconds} s; "
          f"load {loadavg()}",
          flush=True)
    # one URL per webhook (the gateway stores an attachment once per URL: one URL for all would be
    # one download and then duplicates)
    with WahaProcess(MEDIA / "photo.jpg", aliases=int(rate * seconds) + 1) as waha:
        await _end_to_end(tmp, "b3", seconds, waha.url(0).replace("m0.jpg", f"m{NUMBER}.jpg"),
                          {"waha": {"base_url": waha.base_url, "api_key": waha.api_key}}, rate)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["b1", "b2", "b3"], action="append")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--slices", type=int, default=3,
                        help="B1: alternating slices of the bare server and the gateway (default 3)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--wal-pages", action="store_true",
                        help="B1: print the WAL frames the gateway's catalog wrote during its slices, by table and "
                             "index (bench.wal_pages; it holds a read snapshot, so the WAL grows meanwhile)")
    parser.add_argument("--rate", type=float, help="B2/B3: webhooks/s offered (default 1000 and 300)")
    parser.add_argument("--send", metavar="URL", help=argparse.SUPPRESS)  # the sender process
    parser.add_argument("--tag", default="fixed", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, default=REPO,
                        help="run the daemon of this source tree (e.g. an earlier commit from git archive)")
    args = parser.parse_args()
    if args.send:
        print(json.dumps(await fixed_rate(args.send, args.body, args.rate, args.seconds, args.tag)), flush=True)
        return 0
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
            if name == "b1":
                await b1(tmp, args.seconds, args.connections, args.slices, args.wal_pages)
            else:
                bench = b2 if name == "b2" else b3
                await (bench(tmp, args.seconds, args.connections, args.rate) if args.rate
                       else bench(tmp, args.seconds, args.connections))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
