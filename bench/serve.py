"""Serving stored objects through the signed link against nginx (issue 12, B5), each figure beside
nginx's in the same run, with the load average.

The gateway daemon (``python -m gateway serve``, local storage, log level WARNING, ``[serving]
workers = --workers``, default 2) stores a 10 MiB and a 50 KiB object (random bytes) through the
files API upload; ``wrk`` (32 connections, 2 threads) then fetches each object's signed
``/media/{id}/{filename}`` link for ``--seconds``, from the daemon's own port ("gateway") and
from the serving workers' port ("workers"; with ``--workers 0`` not run), and the same file from
Debian's nginx (one worker, ``sendfile on``, no access log, serving the
gateway's storage directory), started from a config in the temp directory as the current user
(pid file, error log and temp paths there too, no daemon mode). nginx, the gateway and the workers
run in turns for ``--repeat`` rounds; requests/s, MB/s and the ratios gateway ÷ nginx and workers
÷ nginx of each round are printed with the load average and the CPU seconds each worker used (how
evenly the shared socket spread the connections), then the median ratios per size, and once per
size two bare aiohttp baselines on the same file (:mod:`bench.bare_file_server`: ``FileResponse``,
and the bytes from memory).

Installs ``wrk`` and ``nginx-light`` with ``scripts/system-deps --bench`` (Debian, as root) if they
are missing. From the repository root::

    .venv/bin/python -m bench.serve                 # 10 s per run, 3 rounds per size, 2 workers
    .venv/bin/python -m bench.serve --workers 3 --repeat 1
    .venv/bin/python -m bench.serve --seconds 20 --code DIR   # the daemon of another source tree
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.harness import free_port, loadavg
from tests.conftest import base_config, deep_merge
from tests.daemon import REPO, GatewayProcess, write_toml

API_KEY = "bench-admin-key"
SIZES = {"10 MiB": (10 * 1024 * 1024, 0.9), "50 KiB": (50 * 1024, 0.25)}  # bytes, target ratio


def worker_pids(daemon: int) -> list[int]:
    """The serving workers of the daemon ``daemon`` (its children running ``serve-media``)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == daemon and b"serve-media" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> list[float]:
    """User plus system CPU seconds each of ``pids`` used so far (``/proc/<pid>/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except OSError:
            out.append(float("nan"))
    return out


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    """Run ``wrk`` GETting ``url``; its requests/s, bytes/s and non-2xx answers."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", out)
    if rate is None or transfer is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    scale = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rate": float(rate.group(1)), "bytes": float(transfer.group(1)) * scale[transfer.group(2)],
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": errors.group(1) if errors else ""}  # type: ignore[dict-item]


class Nginx:
    """Debian's nginx serving ``root`` on 127.0.0.1, one worker, ``sendfile on``, everything it
    writes under ``work``, in the foreground as the current user."""

    def __init__(self, work: Path, root: Path):
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        work.mkdir(parents=True, exist_ok=True)
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.getuid() == 0 else ""  # else: ignored
        temps = "\n".join(f"  {kind}_temp_path {work / kind};" for kind in
                          ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.config = work / "nginx.conf"
        self.config.write_text(f"""{user}
daemon off;
master_process on;
worker_processes 1;
pid {work / 'nginx.pid'};
error_log {work / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  default_type application/octet-stream;
{temps}
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
    location / {{ }}
  }}
}}
""")

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        subprocess.run([nginx, "-t", "-q", "-p", str(self.work), "-e", str(self.work / "error.log"),
                        "-c", str(self.config)], check=True)
        self.proc = subprocess.Popen([nginx, "-p", str(self.work), "-e", str(self.work / "error.log"),
                                      "-c", str(self.config)], stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


async def _wait_ok(url: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return await r.read()
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} does not answer 200")
            await asyncio.sleep(0.05)


async def _upload(gw: GatewayProcess, name: str, data: bytes) -> dict[str, object]:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    async with aiohttp.ClientSession() as http, http.post(
            f"{gw.url}/api/v1/files", data=form, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        if r.status != 201:
            raise RuntimeError(f"upload of {name}: {r.status} {await r.text()}")
        info: dict[str, object] = await r.json()
        return info


def _stored_path(storage_root: Path, size: int, sha256: str) -> Path:
    """The file of the stored object with that size and digest (the bench stores two)."""
    for path in storage_root.rglob("*"):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(storage_root).parts) \
                and path.stat().st_size == size and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
    raise FileNotFoundError(f"no stored file of {size} bytes with sha256 {sha256}")


async def run(tmp: Path, code: Path, seconds: int, connections: int, repeat: int, workers: int) -> int:
    port, serving_port = free_port(), free_port()
    work = tmp / "gateway"
    work.mkdir()
    data = deep_merge(base_config(work, port, None, None),  # the tests' settings, with the default job polling
                      {"log": {"level": "WARNING"}, "retention": {"enabled": False}, "queue": {"poll_interval": 1.0},
                       "api": {"keys": [{"name": "bench", "key": API_KEY, "scopes": ["admin"]}]}})
    if workers:
        data["serving"] = {"workers": workers, "port": serving_port}
    serving = f"http://127.0.0.1:{serving_port}"
    gw = GatewayProcess(write_toml(work / "gateway.toml", data), port, work / "daemon.log", cwd=code)
    storage_root = work / "var" / "media"
    await gw.start()
    nginx: Nginx | None = None
    bare: subprocess.Popen[str] | None = None
    failed = False
    try:
        objects = {}
        for label, (size, target) in SIZES.items():
            body = os.urandom(size)
            info = await _upload(gw, f"bench-{size}.bin", body)
            path = _stored_path(storage_root, size, str(info["sha256"]))
            objects[label] = (str(info["links"]["content"]),  # type: ignore[index]
                              path.relative_to(storage_root).as_posix(), size, target, info["sha256"])
        nginx = Nginx(tmp / "nginx", storage_root)
        nginx.start()
        bare = subprocess.Popen([sys.executable, "-m", "bench.bare_file_server", "--root", str(storage_root)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert bare.stdout is not None
        bare_port = int(bare.stdout.readline().split()[1])
        pids = worker_pids(gw.pid)
        if len(pids) != workers:
            raise RuntimeError(f"{len(pids)} serving workers run, not {workers}")
        for label, (link, key, size, target, sha256) in objects.items():
            nginx_url = f"http://127.0.0.1:{nginx.port}/{key}"
            bare_url = f"http://127.0.0.1:{bare_port}/file/{key}"
            memory_url = f"http://127.0.0.1:{bare_port}/memory/{key}"
            urls = {"nginx": nginx_url, "gateway": link.replace(serving, gw.url)}
            if workers:
                urls["workers"] = link  # new links point at the workers
            for url in (*urls.values(), bare_url, memory_url):  # all serve the very same bytes
                got = hashlib.sha256(await _wait_ok(url)).hexdigest()
                if got != sha256:
                    raise RuntimeError(f"{url} served sha256 {got}, stored {sha256}")
            print(f"\n== B5 {label} ({size} bytes), wrk {connections} connections, {seconds} s each, "
                  f"{repeat} rounds, {workers} serving workers; load {loadavg()}", flush=True)
            ratios: dict[str, list[float]] = {name: [] for name in urls if name != "nginx"}
            runs: list[dict[str, dict[str, float]]] = []
            for n in range(repeat):  # the servers back to back, in turns: the machine's load moves
                order = list(urls.items())[::1 if n % 2 == 0 else -1]
                pair: dict[str, dict[str, float]] = {}
                for name, url in order:
                    cpu = cpu_seconds(pids)
                    pair[name] = wrk(url, seconds, connections)
                    if name == "workers":
                        split = " ".join(f"{after - before:.1f}" for before, after in zip(cpu, cpu_seconds(pids)))
                        pair[name]["split"] = split  # type: ignore[assignment]
                for name in ratios:
                    ratios[name].append(pair[name]["rate"] / pair["nginx"]["rate"])
                runs.append(pair)
                failed |= any(bool(r["non2xx"]) for r in pair.values())
                for name, r in pair.items():
                    split = f"  worker CPU s {r['split']}" if "split" in r else ""
                    print(f"  round {n + 1} {name:8} {r['rate']:9.0f} requests/s {r['bytes'] / 1e6:8.1f} MB/s"
                          f"  non-2xx {r['non2xx']:.0f} {r['errors']}{split}")
                print(f"  round {n + 1} " + ", ".join(f"{name} / nginx {r[-1]:.2f}" for name, r in ratios.items())
                      + f"; load {loadavg()}", flush=True)
            aio = wrk(bare_url, seconds, connections)
            mem = wrk(memory_url, seconds, connections)
            nginx_rate = statistics.median(r["nginx"]["rate"] for r in runs)
            print(f"  bare aiohttp FileResponse {aio['rate']:.0f} requests/s ({aio['rate'] / nginx_rate:.2f} x nginx's "
                  f"median); bare aiohttp, bytes from memory {mem['rate']:.0f} requests/s "
                  f"({mem['rate'] / nginx_rate:.2f}); load {loadavg()}")
            for name, values in ratios.items():
                median = statistics.median(values)
                who = f"{workers} workers" if name == "workers" else "gateway"
                print(f"B5 {label} {who} / nginx: median {median:.2f} [{min(values):.2f}-{max(values):.2f}] "
                      f"(target >= {target}); {who} {statistics.median(r[name]['rate'] for r in runs):.0f}/s "
                      f"{statistics.median(r[name]['bytes'] for r in runs) / 1e6:.0f} MB/s, nginx {nginx_rate:.0f}/s "
                      f"{statistics.median(r['nginx']['bytes'] for r in runs) / 1e6:.0f} MB/s (medians)", flush=True)
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait()
        if nginx is not None:
            nginx.stop()
        status = await gw.terminate()
        if status != 0:
            print(f"daemon exited {status}: {gw.log_tail()}")
            failed = True
    return 1 if failed else 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of nginx and the gateway per size (median)")
    parser.add_argument("--workers", type=int, default=2, help="[serving] workers of the daemon (0: none)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="run the daemon of this source tree (e.g. an earlier commit from git archive)")
    args = parser.parse_args()
    if not shutil.which("wrk") or not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        subprocess.run([str(REPO / "scripts" / "system-deps"), "--bench"], check=True)
    nproc = len(os.sched_getaffinity(0))
    print(f"daemon from {args.code.resolve()}; {nproc} cores; load average {loadavg()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-serve-"))
    try:
        return await run(tmp, args.code.resolve(), args.seconds, args.connections, args.repeat, args.workers)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
