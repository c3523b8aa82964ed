"""Fuzz run: 10,000 generated hostile webhook bodies against the gateway daemon (issue 10).

What happens, all on 127.0.0.1 in a temp directory:

1. The WAHA emulator, the Graph (Meta) emulator and the bot sink run as aiohttp servers in this
   process; the emulators serve a photo and a PDF from ``tests/fixtures/media``.
2. The daemon runs as a subprocess (``tests.daemon.GatewayProcess``) with both providers and
   their signatures configured (``hmac_key``, ``app_secret``), local storage, log level WARNING.
3. ``--count`` bodies (default 10,000) are generated from ``random.Random(--seed)`` (default 10),
   half for ``/webhooks/waha``, half for ``/webhooks/meta``: the documented payloads (media
   pointed at the emulators, a fresh message id) with values replaced by random JSON (lone
   surrogates, control characters, 5,000-character strings, nesting up to 3,000 levels) or
   removed; random JSON; random bytes; raw surrogates (not UTF-8); bare deep nesting. One body in
   four carries a wrong signature (missing, wrong digest, non-ASCII, wrong algorithm). They are
   posted by ``--concurrency`` clients (default 8).
4. Then the run waits until no job is queued or running and reads the catalog.

Printed: answers by status; **5xx answers** (must be 0); **accepted wrong signatures** (a 2xx for a
body whose signature was wrong; must be 0); **dead jobs** (must be 0); accepted events not
forwarded; tracebacks in the daemon's log; the daemon's RSS (``VmRSS``) after a warm-up of 200
valid webhooks and after the run, settled (growth must stay under ``--rss-growth-mb``, default 20);
the webhook rate against a baseline measured in the same run (the same clients posting valid,
signed webhooks), with the load average. Exit status 1 when a limit is broken.

Run from the repository root::

    .venv/bin/python -m bench.fuzz                       # 10,000 bodies, seed 10
    .venv/bin/python -m bench.fuzz --count 2000 --keep   # keep the temp dir (daemon.log, catalog)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import hmac
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the emulators live in tests/, which is not installed
    sys.path.insert(0, str(REPO))

from bench.stream_1gib import free_port, proc_status, start_server  # noqa: E402
from tests.daemon import GatewayProcess, write_toml  # noqa: E402
from tests.emulators.graph import GraphEmulator  # noqa: E402
from tests.emulators.sink import BotSink  # noqa: E402
from tests.emulators.waha import WahaEmulator  # noqa: E402
from tests.hostile import DELETE, paths_of, real_media_templates, replace_at  # noqa: E402

WAHA_HMAC_KEY, META_APP_SECRET, WAHA_API_KEY = "fuzz-hmac-key", "fuzz-app-secret", "fuzz-waha-key"
MB = 1000 * 1000
WARMUP = 200
SETTLE_TIMEOUT = 600.0
ODD_STRINGS = ["", "\ud800", "a\udfffb", "\x00\r\n\t", "é" * 40, "x" * 5000, "message", "message.any",
               "../../etc/passwd", "image/jpeg", "audio/ogg; codecs=opus", "%00", "\u202e", "null",
               "http://169.254.169.254/latest/meta-data/", "http://2130706433/x"]


# -- generation ------------------------------------------------------------------------------------
def random_string(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(ODD_STRINGS)
    alphabet = rng.choice([(0x20, 0x7E), (0, 0x1F), (0x80, 0x2FFF), (0xD800, 0xDFFF), (0x1F300, 0x1F6FF)])
    return "".join(chr(rng.randint(*alphabet)) for _ in range(rng.randint(0, 20)))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice([None, True, False, rng.randint(-2**70, 2**70), rng.random() * 1e300,
                           float("nan"), float("inf"), random_string(rng), random_string(rng)])
    if roll < 0.6:
        n = rng.choice([10, 100, 500, 999, 1000, 3000])
        return json.loads("[" * n + "]" * n) if n < 900 else {"deep": "marker"}  # json.loads' own limit
    if roll < 0.8:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_string(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutate(rng: random.Random, template: dict[str, Any], serial: int) -> Any:
    """``template`` with a fresh message id and a few values replaced or removed."""
    data = copy.deepcopy(template)
    if "payload" in data:
        data["payload"]["id"] = f"fuzz-{serial}"
    else:
        data["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = f"wamid.fuzz-{serial}"
    paths = paths_of(data)
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
        replace_at(data, rng.choice(paths), DELETE if rng.random() < 0.2 else random_json(rng))
    return data


def generate_body(rng: random.Random, template: dict[str, Any], serial: int) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return json.dumps(mutate(rng, template, serial)).encode()
    if roll < 0.7:
        return json.dumps(mutate(rng, template, serial), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if roll < 0.8:
        return json.dumps(random_json(rng)).encode()
    if roll < 0.9:
        return rng.randbytes(rng.randint(0, 300))
    n = rng.choice([64, 65, 500, 999, 1000, 5000, 100_000])
    return (rng.choice(['{"a":', "["]) + "[" * n + "]" * n + ("}" if rng.random() < 0.5 else "]")).encode()


def sign(provider: str, body: bytes) -> dict[str, str]:
    if provider == "waha":
        return {"X-Webhook-Hmac": hmac.new(WAHA_HMAC_KEY.encode(), body, hashlib.sha512).hexdigest(),
                "X-Webhook-Hmac-Algorithm": "sha512"}
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(META_APP_SECRET.encode(), body, hashlib.sha256).hexdigest()}


def wrong_signature(rng: random.Random, provider: str, body: bytes) -> dict[str, str]:
    name = "X-Webhook-Hmac" if provider == "waha" else "X-Hub-Signature-256"
    good = sign(provider, body)[name]
    choice = rng.randrange(6)
    if choice == 0:
        return {}
    if choice == 1:
        return {name: good[:-1] + ("0" if good[-1] != "0" else "1")}
    if choice == 2:
        return {name: "é" * len(good)}
    if choice == 3:
        return {name: good + "\u0661"}
    if choice == 4 and provider == "waha":
        return {name: good, "X-Webhook-Hmac-Algorithm": "md5"}
    return {name: sign("meta" if provider == "waha" else "waha", body)[
        "X-Hub-Signature-256" if provider == "waha" else "X-Webhook-Hmac"]}


# -- the run ---------------------------------------------------------------------------------------
async def post_all(http: aiohttp.ClientSession, url: str, requests: list[tuple[str, bytes, dict[str, str], bool]],
                   concurrency: int) -> tuple[Counter, int, float]:
    """POST every ``(provider, body, headers, signature_ok)``; return (answers by status, 2xx
    answers to a wrong signature, seconds)."""
    statuses: Counter = Counter()
    wrongly_accepted = 0
    queue = iter(requests)

    async def client() -> None:
        nonlocal wrongly_accepted
        for provider, body, headers, ok in queue:
            async with http.post(f"{url}/webhooks/{provider}", data=body, headers=headers) as r:
                await r.read()
            statuses[r.status] += 1
            if r.status < 300 and not ok:
                wrongly_accepted += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses, wrongly_accepted, time.perf_counter() - started


def catalog_counts(db: Path) -> tuple[dict[str, int], int, int]:
    """(jobs by state, events, events without a forward)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        jobs = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        unforwarded = conn.execute("SELECT COUNT(*) FROM events WHERE forward IS NULL").fetchone()[0]
    return jobs, events, unforwarded


async def settle(db: Path) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        jobs, _, _ = catalog_counts(db)
        if not jobs.get("queued") and not jobs.get("running"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs did not settle: {jobs}")
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace, workdir: Path) -> bool:
    waha = WahaEmulator(api_key=WAHA_API_KEY, lifetime=3600.0, workdir=workdir / "waha-files")
    graph = GraphEmulator(token="fuzz-graph-token", url_ttl=3600)
    sink = BotSink()
    runners = []
    for emu in (waha, graph):
        runner, emu.base_url = await start_server(emu.app)
        runners.append(runner)
    runner, base = await start_server(sink.app)
    runners.append(runner)
    sink_url = f"{base}/hook"

    templates = real_media_templates(waha, graph)

    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 10},
        "catalog": {"path": str(workdir / "var" / "gateway.db")},
        "media": {"link_secret": "fuzz-link-secret"},
        "storage": {"backend": "local", "local": {"root": str(workdir / "var" / "media")}},
        "queue": {"max_attempts": 3, "backoff_base": 0.05, "backoff_max": 0.2},
        "log": {"level": "WARNING", "format": "json"},
        "providers": {"waha": {"base_url": waha.base_url, "api_key": WAHA_API_KEY, "hmac_key": WAHA_HMAC_KEY},
                      "meta": {"app_secret": META_APP_SECRET, "access_token": graph.token,
                               "graph_url": graph.base_url, "api_version": graph.api_version,
                               "download_hosts": ["127.0.0.1"]}},
        "targets": [{"name": "bot", "url": sink_url, "timeout": 30}],
    }
    daemon = GatewayProcess(write_toml(workdir / "gateway.toml", config), port, workdir / "daemon.log")
    await daemon.start()
    db = workdir / "var" / "gateway.db"
    ok = True
    try:
        rng = random.Random(args.seed)

        def valid(serial: int) -> tuple[str, bytes, dict[str, str], bool]:
            provider = ("waha", "meta")[serial % 2]
            body = json.dumps(_with_id(templates[provider][serial // 2 % 2], serial)).encode()
            return provider, body, {"Content-Type": "application/json", **sign(provider, body)}, True

        async with aiohttp.ClientSession() as http:
            # warm-up: valid webhooks (the lazy imports, libmagic, caches), then the RSS baseline
            await post_all(http, daemon.url, [valid(-1 - i) for i in range(WARMUP)], args.concurrency)
            await settle(db)
            rss_before = proc_status(daemon.pid).get("VmRSS", 0)
            # the rate baseline, same clients and run: valid signed webhooks
            base_statuses, _, base_seconds = await post_all(
                http, daemon.url, [valid(-10_000 - i) for i in range(args.baseline)], args.concurrency)
            await settle(db)

            requests = []
            for serial in range(args.count):
                provider = ("waha", "meta")[serial % 2]
                body = generate_body(rng, rng.choice(templates[provider]), serial)
                headers = {"Content-Type": rng.choice(["application/json", "text/plain", "", "x/\u00e9"])}
                good = rng.random() >= 0.25
                headers.update(sign(provider, body) if good else wrong_signature(rng, provider, body))
                requests.append((provider, body, headers, good))
            load_before = os.getloadavg()
            statuses, wrongly_accepted, seconds = await post_all(http, daemon.url, requests, args.concurrency)
            load_after = os.getloadavg()
            settle_started = time.perf_counter()
            await settle(db)
            settle_seconds = time.perf_counter() - settle_started
            await asyncio.sleep(1.0)
            rss_after = proc_status(daemon.pid).get("VmRSS", 0)
        jobs, events, unforwarded = catalog_counts(db)
        await asyncio.sleep(0.5)  # the last deliveries' answers
        delivered = len({d.headers.get("X-Gateway-Event-Id") for d in sink.deliveries})
        log_text = (workdir / "daemon.log").read_text(errors="replace")
        tracebacks = log_text.count("Traceback (most recent call last)") + log_text.count('"exc_info"')
        fivexx = sum(n for s, n in statuses.items() if s >= 500)
        growth = (rss_after - rss_before) / MB
        rate, base_rate = args.count / seconds, args.baseline / base_seconds
        print(f"bodies: {args.count} (seed {args.seed}, {args.concurrency} clients), "
              f"{sum(1 for r in requests if not r[3])} with a wrong signature")
        print(f"answers: {dict(sorted(statuses.items()))}")
        print(f"5xx answers: {fivexx} (must be 0)")
        print(f"accepted wrong signatures: {wrongly_accepted} (must be 0)")
        print(f"dead jobs: {jobs.get('dead', 0)} (must be 0); jobs {dict(sorted(jobs.items()))}")
        print(f"accepted events: {events} (warm-up and baseline included), without a forward: {unforwarded}, "
              f"delivered to the bot: {delivered}")
        print(f"tracebacks in the daemon log: {tracebacks}")
        print(f"daemon RSS: {rss_before / MB:.1f} MB before (after {WARMUP} valid webhooks), "
              f"{rss_after / MB:.1f} MB after, growth {growth:+.1f} MB (limit {args.rss_growth_mb})")
        print(f"rate: {rate:.0f} hostile webhooks/s vs {base_rate:.0f} valid signed webhooks/s "
              f"(baseline, same run; answers {dict(base_statuses)}): ratio {rate / base_rate:.2f}; "
              f"queue drained {settle_seconds:.1f} s after the last answer")
        print(f"load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after the hostile run")
        ok = (fivexx == 0 and wrongly_accepted == 0 and not jobs.get("dead") and unforwarded == 0
              and tracebacks == 0 and growth < args.rss_growth_mb)
        print("PASS" if ok else "FAIL")
    finally:
        rc = await daemon.terminate()
        if rc != 0:
            print(f"daemon exited with {rc}", file=sys.stderr)
            ok = False
        for runner in runners:
            await runner.cleanup()
    return ok


def _with_id(template: dict[str, Any], serial: int) -> dict[str, Any]:
    data = copy.deepcopy(template)
    if "payload" in data:
        data["payload"]["id"] = f"valid-{serial}"
    else:
        data["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = f"wamid.valid-{serial}"
    return data


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=10_000, help="hostile bodies to send (default 10000)")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--baseline", type=int, default=1000, help="valid webhooks timed as the baseline")
    p.add_argument("--rss-growth-mb", type=float, default=20.0)
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-fuzz-"))
    try:
        ok = asyncio.run(run(args, workdir))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
