"""Serving workers (``[serving]``): processes that only serve stored media, so that serving is not
bound to the daemon's one event loop.

The daemon reserves the serving address (``serving.host``:``serving.port``, :func:`reserve`) and,
once its catalog is open and migrated, :class:`ServingWorkers` starts ``serving.workers``
processes (``gateway serve-media``, a hidden command), each listening on the address with a
socket of its own (``SO_REUSEPORT``, :func:`listen`).
Each worker reads the same settings (the config file and the environment), loads the storage
plugin through the plugin manager, opens the catalog read-only and runs :func:`gateway.app.create_serving_app`: the
routes of the ``media`` tag of :data:`gateway.web.routes.ROUTES` (``/media/...``, ``/public/...``:
the daemon's own handlers) behind the one error middleware. Rows come through
:class:`gateway.store.MediaRows`, whose TTL bounds how long a worker may serve a row the daemon
changed or deleted.

The daemon supervises them: a worker that exits is logged at WARNING and started again after a
backoff; on shutdown the workers get SIGTERM (as the daemon starts its own graceful shutdown) and
are waited for. A worker also exits when the
daemon dies: it watches the read end of a pipe whose write end only the daemon holds, and stops at
its end of file.

The workers' requests are counted in the daemon's ``/metrics`` (``gateway_serving_requests_total``,
``gateway_serving_request_duration_seconds``): each worker writes its counts to files of a
temporary directory (prometheus-client's multiprocess mode, :class:`gateway.metrics.ServingMetrics`)
that the daemon creates, reads at each scrape and removes when it stops; a worker started again
in a slot counts on in the files of the slot (:func:`gateway.metrics.count_as_worker_slot`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from aiohttp import web

from gateway.config import Settings
from gateway.metrics import MULTIPROCESS_DIR_ENV

log = logging.getLogger("gateway.serving")

RESTART_BACKOFF = (0.5, 30.0)
"""Seconds before a dead worker is started again: the first, doubled after each quick death up to
the second; back to the first once a worker ran for :data:`STABLE_AFTER` seconds."""
STABLE_AFTER = 30.0
STOP_MARGIN = 5.0
"""Seconds the workers get after SIGTERM beyond ``server.shutdown_grace`` (which each gives its
requests in progress) before they are killed."""


METRICS_DIR_PREFIX = "gateway-serving-metrics-"
"""The name of a daemon's workers' metrics directory in the temporary directory, before the
daemon's pid and a random part."""


def _remove_stale_metrics_dirs() -> None:
    """Remove the workers' metrics directories that daemons of this user killed before they could
    (their pid no longer runs)."""
    with os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            pid = entry.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
            if not (entry.name.startswith(METRICS_DIR_PREFIX) and pid.isdigit()):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(follow_symlinks=False):
                    continue
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:  # gone meanwhile, or a pid of another user's process: not ours to judge
                continue


def reserve(settings: Settings) -> socket.socket:
    """The daemon's hold on ``serving.host`` (default ``server.host``) and ``serving.port``: a
    socket bound there with ``SO_REUSEPORT`` that does not listen (so it takes no connection).
    Only processes of the same user that set ``SO_REUSEPORT`` too, the workers (:func:`listen`),
    can then bind the address. Raises :class:`OSError` (the address in use)."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.serving_host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((settings.serving_host, settings.serving.port))
    except OSError:
        sock.close()
        raise
    return sock


def listen(settings: Settings) -> socket.socket:
    """A worker's own listening socket on the serving address, with ``SO_REUSEPORT``: the kernel
    spreads new connections over the workers' sockets by their addresses' hash. (One socket
    shared by all would not: the worker that wakes first accepts every connection waiting, and
    32 keep-alive connections opened at once all end up in one process.) Raises :class:`OSError`."""
    return socket.create_server((settings.serving_host, settings.serving.port), reuse_port=True, backlog=1024)


class ServingWorkers:
    """``settings.serving.workers`` processes of ``gateway serve-media`` listening on the address
    ``sock`` holds (:func:`reserve`), started by :meth:`start`, each started again when it exits
    (after a backoff, see :data:`RESTART_BACKOFF`), stopped by :meth:`stop` (which closes ``sock``)."""

    def __init__(self, settings: Settings, sock: socket.socket):
        self.settings = settings
        self.sock = sock
        self.procs: list[asyncio.subprocess.Process | None] = [None] * settings.serving.workers
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._alive_r, self._alive_w = -1, -1  # the pipe whose end of file tells a worker to exit
        #: Where the workers write their metrics (:class:`gateway.metrics.ServingMetrics`); removed by :meth:`stop`.
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        _remove_stale_metrics_dirs()

    @property
    def url(self) -> str:
        """Where the workers listen: ``http://host:port`` (the bound port)."""
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        """Start every worker (without waiting for it to accept)."""
        self._alive_r, self._alive_w = os.pipe()  # both non-inheritable: the read end is passed by number
        self._tasks = [asyncio.create_task(self._supervise(i), name=f"serving-worker-{i}")
                       for i in range(len(self.procs))]
        log.info("serving media on %s with %d worker process(es); links on %s", self.url, len(self.procs),
                 self.settings.media_base_url)

    def running(self) -> int:
        """How many workers run now."""
        return sum(1 for p in self.procs if p is not None and p.returncode is None)

    async def check(self) -> None:
        """Raise :class:`RuntimeError` unless a worker runs (``/readyz``: the serving port would
        answer nothing). Some down while others run is logged by the supervisor, not a failure."""
        if not self.running():
            raise RuntimeError(f"no serving worker runs (of {len(self.procs)})")

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        cmd = [sys.executable, "-m", "gateway", "serve-media", "--alive-fd", str(self._alive_r), "--slot", str(slot)]
        if self.settings.config_file is not None:
            cmd += ["--config", str(self.settings.config_file)]
        # its own session: a Ctrl-C in the terminal reaches the daemon only, which stops the workers
        return await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, pass_fds=(self._alive_r,),
            start_new_session=True, env={**os.environ, MULTIPROCESS_DIR_ENV: self.metrics_dir})

    async def _supervise(self, slot: int) -> None:
        backoff = RESTART_BACKOFF[0]
        while not self._stopping:
            started = time.monotonic()
            try:
                proc = self.procs[slot] = await self._spawn(slot)
            except OSError as exc:
                log.warning("cannot start serving worker %d: %s; trying again in %.1f s", slot, exc, backoff)
            else:
                status = await proc.wait()
                if self._stopping:
                    return
                if time.monotonic() - started >= STABLE_AFTER:
                    backoff = RESTART_BACKOFF[0]
                log.warning("serving worker %d (pid %d) exited with status %d; starting it again in %.1f s",
                            slot, proc.pid, status, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF[1])

    async def terminate(self) -> None:
        """Stop restarting workers and send each SIGTERM, without waiting (the daemon's
        ``on_shutdown``: they finish their requests while the daemon finishes its own)."""
        if self._stopping:
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()  # a supervisor waiting on a worker or in its backoff
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """:meth:`terminate`, then wait for every worker (SIGKILL after ``server.shutdown_grace``
        + :data:`STOP_MARGIN` seconds); close the pipe and the socket, remove the metrics directory.
        Idempotent."""
        await self.terminate()
        procs = [p for p in self.procs if p is not None and p.returncode is None]
        timeout = self.settings.server.shutdown_grace + STOP_MARGIN
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        except asyncio.TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.warning("serving worker pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for fd in (self._alive_r, self._alive_w):
            if fd >= 0:
                os.close(fd)
        self._alive_r = self._alive_w = -1
        self.sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


async def run_worker(app: web.Application, sock: socket.socket, alive_fd: int, shutdown_timeout: float) -> None:
    """Serve ``app`` on ``sock`` (:func:`listen`) until SIGTERM or SIGINT, or until ``alive_fd``
    (the daemon's pipe) reaches its end of file; then close gracefully (``shutdown_timeout``
    seconds)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def parent_gone() -> None:
        try:
            if os.read(alive_fd, 1):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(alive_fd)
        log.warning("the daemon is gone; serving worker pid %d stops", os.getpid())
        stop.set()

    os.set_blocking(alive_fd, False)
    loop.add_reader(alive_fd, parent_gone)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        await stop.wait()
    finally:
        loop.remove_reader(alive_fd)
        await runner.cleanup()
