"""The durable job queue's worker pool (DESIGN §6). Jobs live in the catalog's ``jobs`` table.

A worker claims the oldest due ``queued`` job (marking it ``running`` and counting the attempt),
runs the handler for its ``kind`` and records the outcome:

- success: ``done``, with any follow-up jobs enqueued in the same transaction (then the
  handler's ``after`` step, if any, runs: it cannot undo or repeat the job);
- :class:`PermanentError`: ``dead`` at once (the dead letter; retry by hand);
- :class:`RetryLater`: back to ``queued`` after the backoff, however many attempts it took;
- any other exception: back to ``queued`` after an exponential backoff with jitter
  (``backoff_base * 2**(attempt-1)``, capped at ``backoff_max``, the wait drawn uniformly from
  its upper half), or ``dead`` after ``max_attempts``.

On start, jobs left ``running`` by a crash are queued again (a shared catalog: only those whose
lease ran out, see below). While jobs run, their leases are renewed every third of
``settings.lease`` seconds (:meth:`CatalogContract.renew_leases`), so that replicas sharing a
PostgreSQL catalog claim a job again only when the replica running it died. On stop, workers take no new job;
running jobs get ``grace`` seconds to finish, then are cancelled and returned to the queue with
their attempt uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog import CatalogContract
from gateway.config import QueueSettings
from gateway.metrics import Metrics

log = logging.getLogger("gateway.jobs")


class PermanentError(Exception):
    """A job failure that retrying cannot fix: the job goes dead at once."""


class RetryLater(Exception):
    """A failure of the gateway's own infrastructure (storage unreachable), not of the job: it is
    retried with the usual backoff (capped at ``backoff_max``) and never goes dead for it."""


@dataclass(slots=True)
class Job:
    """A claimed job. ``attempts`` counts this one; ``last_attempt`` is true when no retry follows."""

    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int

    @property
    def last_attempt(self) -> bool:
        """True when a failure of this attempt makes the job dead."""
        return self.attempts >= self.max_attempts


@dataclass(slots=True)
class JobResult:
    """What a successful handler hands back: follow-up jobs ``(kind, key, payload)`` and an
    optional ``(event_id, {column: value})`` update, committed with the job's completion; and
    ``after``, a coroutine function run once that commit is done (its errors are logged, never
    retried: the job's effect has happened), so that nothing slow sits between the effect and
    the commit that records it."""

    followups: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    event_update: tuple[str, dict[str, Any]] | None = None
    after: Callable[[], Awaitable[None]] | None = None


Handler = Callable[[Job], Awaitable[JobResult | None]]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): exponential, capped,
    with "equal jitter" (uniform in the upper half) so retries of many jobs spread out."""
    exponent = min(max(0, attempt - 1), 64)  # 2**64 * base is past any cap; no float overflow
    delay = min(cap, base * 2.0 ** exponent)
    return delay / 2 + (rng or random).uniform(0, delay / 2)


class JobQueue:
    """Runs ``settings.workers`` workers over the catalog's job table.

    ``handlers`` maps a job kind (``ingest``, ``deliver``) to a coroutine function taking a
    :class:`Job`.
    """

    def __init__(self, catalog: CatalogContract, settings: QueueSettings, metrics: Metrics,
                 handlers: dict[str, Handler]):
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics
        self.handlers = handlers
        self._wake = asyncio.Event()
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[int, asyncio.Task[None]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Wake idle workers: new jobs were committed."""
        self._wake.set()

    async def start(self) -> None:
        """Requeue jobs a crash left running, then start the workers."""
        recovered = await self.catalog.requeue_running()
        if recovered:
            log.warning("requeued %d job(s) left running by an earlier crash", recovered)
        self._stopping = False
        self._workers = [asyncio.create_task(self._worker(i), name=f"job-worker-{i}")
                         for i in range(self.settings.workers)]
        self._renewer = asyncio.create_task(self._renew_leases(), name="job-leases")

    async def stop(self, grace: float) -> None:
        """Take no new jobs; wait up to ``grace`` seconds for running ones; requeue the rest."""
        self._stopping = True
        self._wake.set()
        running = list(self._running.values())
        if running:
            log.info("waiting up to %.0fs for %d running job(s)", grace, len(running))
            await asyncio.wait(running, timeout=grace)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    async def _renew_leases(self) -> None:
        """Every third of the lease, extend the leases of the jobs running here."""
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            running = list(self._running)
            if not running:
                continue
            try:
                kept = await self.catalog.renew_leases(running)
            except Exception as exc:  # the catalog is down: the next round tries again
                log.warning("could not renew the leases of %d running job(s): %s", len(running), exc)
                continue
            if kept < len(running):
                log.warning("%d of %d running job(s) lost their lease to another replica",
                            len(running) - kept, len(running))

    async def _worker(self, index: int) -> None:
        while not self._stopping:
            try:
                row = await self.catalog.claim_job()
            except Exception:
                log.exception("could not claim a job; retrying")
                await asyncio.sleep(self.settings.poll_interval)
                continue
            if row is None:
                await self._idle()
                continue
            job = Job(id=row["id"], kind=row["kind"], key=row["key"], payload=row["payload"],
                      attempts=row["attempts"], max_attempts=self.settings.max_attempts)
            task = asyncio.current_task()
            assert task is not None
            self._running[job.id] = task
            try:
                await self._run(job)
            except asyncio.CancelledError:
                await asyncio.shield(self.catalog.release_job(job.id))
                log.info("job %s interrupted by shutdown; back in the queue", job.key)
                raise
            finally:
                self._running.pop(job.id, None)

    async def _idle(self) -> None:
        timeout = self.settings.poll_interval
        try:
            nxt = await self.catalog.next_run_at()
        except Exception:
            nxt = None
        if nxt is not None:
            timeout = max(0.01, min(timeout, nxt - time.time()))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _run(self, job: Job) -> None:
        handler = self.handlers.get(job.kind)
        started = time.monotonic()
        if handler is None:
            await self.catalog.fail_job(job.id, f"no handler for job kind {job.kind!r}", None)
            self.metrics.jobs_processed.labels(job.kind, "dead").inc()
            return
        try:
            result = await handler(job) or JobResult()
        except asyncio.CancelledError:
            raise
        except PermanentError as exc:
            log.error("job %s failed for good: %s", job.key, exc, extra={"job_id": job.id})
            await self.catalog.fail_job(job.id, str(exc), None)
            self.metrics.jobs_processed.labels(job.kind, "dead").inc()
            return
        except RetryLater as exc:
            delay = backoff_delay(job.attempts, self.settings.backoff_base, self.settings.backoff_max)
            log.warning("job %s deferred (%s); retry in %.1fs", job.key, exc, delay, extra={"job_id": job.id})
            await self.catalog.fail_job(job.id, f"deferred: {exc}", time.time() + delay)
            self.metrics.jobs_processed.labels(job.kind, "retry").inc()
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if job.last_attempt:
                log.error("job %s dead after %d attempts: %s", job.key, job.attempts, error,
                          extra={"job_id": job.id})
                await self.catalog.fail_job(job.id, error, None)
                self.metrics.jobs_processed.labels(job.kind, "dead").inc()
            else:
                delay = backoff_delay(job.attempts, self.settings.backoff_base, self.settings.backoff_max)
                log.warning("job %s attempt %d failed (%s); retry in %.1fs", job.key, job.attempts,
                            error, delay, extra={"job_id": job.id})
                await self.catalog.fail_job(job.id, error, time.time() + delay)
                self.metrics.jobs_processed.labels(job.kind, "retry").inc()
            return
        finally:
            self.metrics.job_duration.labels(job.kind).observe(time.monotonic() - started)
        await self.catalog.complete_job(job.id, result.followups, result.event_update)
        self.metrics.jobs_processed.labels(job.kind, "done").inc()
        if result.followups:
            self.notify()
        if result.after is not None:
            try:
                await result.after()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s is done, but what runs after it failed", job.key,
                              extra={"job_id": job.id})
