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

Two lanes, each with its own workers (DESIGN §6): the fetch lane runs ``ingest`` jobs (media
downloads, I/O-bound; the earliest provider deadline first), the deliver lane every other kind.
Neither waits behind the other's backlog. A monitor watches the oldest waiting media: when it has
used ``backlog_ready_fraction`` of its deadline, :meth:`JobQueue.check` raises (``/readyz``) and
one WARNING says so. The monitor and the fetch lane also feed :attr:`JobQueue.admission`, which
holds back media webhooks the fetch lane could not store in time (:mod:`gateway.admission`).

On start, jobs left ``running`` by a crash are queued again (a shared catalog: only those whose
lease ran out, see below). While jobs run, their leases are renewed every third of
``settings.lease`` seconds (:meth:`CatalogContract.renew_leases`), so that replicas sharing a
PostgreSQL catalog claim a job again only when the replica running it died. On stop, workers take no new job;
running jobs get ``grace`` seconds to finish, then are cancelled and returned to the queue with
their attempt uncounted.
"""

from __future__ import annotations

import asyncio
from collections import deque
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.admission import Admission
from gateway.catalog import CatalogContract, ClaimedJob, MediaRow, MediaTaken
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
    the commit that records it. ``repeatable``: running the job again is harmless (a delivery,
    at least once), so its completion need not wait for the disk
    (:meth:`CatalogContract.complete_job`'s ``durable=False``).

    ``media``: the rows of objects the job stored, inserted by that same commit (an ingest's: its
    rewritten payload links them). ``taken``: when the commit refuses them, because a copy of one
    of those attachments was recorded meanwhile (:class:`MediaTaken`), the handler's revised
    result, committed instead; it raises as the handler would."""

    followups: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    event_update: tuple[str, dict[str, Any]] | None = None
    after: Callable[[], Awaitable[None]] | None = None
    repeatable: bool = False
    media: list[MediaRow] = field(default_factory=list)
    taken: Callable[[MediaTaken], Awaitable[JobResult]] | None = None


Handler = Callable[[Job], Awaitable[JobResult | None]]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): exponential, capped,
    with "equal jitter" (uniform in the upper half) so retries of many jobs spread out."""
    exponent = min(max(0, attempt - 1), 64)  # 2**64 * base is past any cap; no float overflow
    delay = min(cap, base * 2.0 ** exponent)
    return delay / 2 + (rng or random).uniform(0, delay / 2)


MAX_REVISIONS = 3
"""Revised results (:attr:`JobResult.taken`) a job's completion takes at most before the job is
retried later."""
FETCH_KINDS = ("ingest",)
"""The job kinds of the fetch lane; every other kind runs in the deliver lane."""
UNKNOWN_KINDS_EVERY = 60.0
"""Seconds between two sweeps for jobs of a kind no lane runs (the first at start). Such jobs come
only from another gateway version sharing the catalog."""
DUE_TTL = 0.1
"""Seconds the workers of a lane going idle share one catalog answer to when its next queued job
is due (this process's own retries are added to it as they are scheduled)."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """Idle workers of this process reserved by :meth:`JobQueue.reserve` for jobs a commit is
    about to add: ``lanes`` maps a lane to how many workers; ``kinds`` are the job kinds to create
    claimed (:meth:`gateway.catalog.CatalogContract.record_webhook`'s ``claim``)."""

    lanes: dict[str, int] = field(default_factory=dict)
    kinds: frozenset[str] = frozenset()


class Backlogged(Exception):
    """The gateway cannot keep up: the oldest waiting media is close to its provider's deadline."""


class JobQueue:
    """Runs the fetch lane (``settings.fetch_workers`` workers, :data:`FETCH_KINDS`) and the
    deliver lane (``settings.workers`` workers, every other kind) over the catalog's job table.

    ``handlers`` maps a job kind (``ingest``, ``deliver``) to a coroutine function taking a
    :class:`Job`.
    """

    def __init__(self, catalog: CatalogContract, settings: QueueSettings, metrics: Metrics,
                 handlers: dict[str, Handler]):
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics
        self.handlers = handlers
        #: lane name -> (its job kinds, its workers). Jobs of a kind without a handler are
        #: claimed by the backlog monitor, and go dead.
        self.lanes: dict[str, tuple[tuple[str, ...], int]] = {
            "fetch": (FETCH_KINDS, settings.fetch_workers),
            "deliver": (tuple(k for k in handlers if k not in FETCH_KINDS), settings.workers),
        }
        self._idle_workers: dict[str, list[asyncio.Future[None]]] = {lane: [] for lane in self.lanes}
        #: lane -> jobs :meth:`notify` announced that no worker here has claimed yet: a worker
        #: claiming one of them need not wake the next (the announcement woke one per job)
        self._announced: dict[str, int] = {lane: 0 for lane in self.lanes}
        #: lane -> (monotonic seconds when read, when its next queued job is due or None), for :meth:`_idle`
        self._due: dict[str, tuple[float, float | None]] = {}
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[int, asyncio.Task[None]] = {}
        #: Jobs whose outcome the catalog could not record (it failed meanwhile): still ``running``
        #: there, released back to the queue by the monitor once the catalog answers again.
        self._unreleased: set[int] = set()
        #: lane -> jobs claimed in the commit that added them (a parent's completion, a webhook),
        #: waiting for a worker here
        self._handed: dict[str, deque[ClaimedJob]] = {lane: deque() for lane in self.lanes}
        #: lane -> idle workers :meth:`reserve` promised to commits still running
        self._reserved: dict[str, int] = {lane: 0 for lane in self.lanes}
        self._renewer: asyncio.Task[None] | None = None
        #: Why the gateway cannot keep up, or None (set by the backlog monitor).
        self.backlog: str | None = None
        #: Seconds between the monitor's sweeps for jobs of unknown kinds (:meth:`_dead_letter_unknown`).
        self.unknown_kinds_every = UNKNOWN_KINDS_EVERY
        self._unknown_checked: float | None = None  # monotonic seconds of the last sweep
        #: Whether a media webhook may be acknowledged now (fed by the monitor and the fetch lane).
        self.admission = Admission(settings, metrics, catalog.media_lifetime)

    def notify(self, kinds: Collection[str] | None = None) -> None:
        """New jobs (of ``kinds``; None: any) were committed: wake one idle worker of each lane
        that runs them, and count the job as announced there. A worker that claims a job nobody
        announced (a retry come due, another replica's, one left from before a restart) wakes
        the next one (:meth:`_wake_one`), so a backlog wakes as many workers as it has jobs; one
        that claims an announced job does not (each announcement woke a worker of its own), so a
        single webhook sends one worker to the catalog, not two."""
        for lane, (lane_kinds, _) in self.lanes.items():
            if kinds is None or any(k in lane_kinds for k in kinds):
                self._announced[lane] += 1
                self._wake_one(lane)

    def reserve(self, jobs: Mapping[str, int]) -> Handoff:
        """For a commit about to add ``jobs`` (kind -> how many): reserve the idle workers of each
        lane that has enough of them for all its jobs there (idle, and not promised to a job
        handed, announced or reserved already), so that the commit creates those jobs claimed and
        :meth:`hand` gives them to the workers: no claim, no wake-up through the catalog. A lane
        that is busy gets none: its jobs are queued and claimed in deadline order. Every
        reservation must end in :meth:`hand` (with no jobs if the commit failed)."""
        if self._stopping:
            return Handoff()
        wanted: dict[str, int] = {}
        kinds: dict[str, set[str]] = {}
        for kind, count in jobs.items():
            lane = self._lane_of(kind)
            if lane is not None and count > 0:
                wanted[lane] = wanted.get(lane, 0) + count
                kinds.setdefault(lane, set()).add(kind)
        lanes = {lane: count for lane, count in wanted.items() if self._free(lane) >= count}
        for lane, count in lanes.items():
            self._reserved[lane] += count
        return Handoff(lanes, frozenset(k for lane in lanes for k in kinds[lane]))

    def hand(self, handoff: Handoff, claimed: Collection[ClaimedJob]) -> None:
        """End the reservation ``handoff`` (:meth:`reserve`): the jobs its commit created claimed
        go to the workers of their lanes (a worker woken for each). After :meth:`stop` has run,
        they stay running in the catalog until its next start requeues them (SQLite) or their
        lease runs out (PostgreSQL), as after a crash."""
        for lane, count in handoff.lanes.items():
            self._reserved[lane] -= count
        for row in claimed:
            to = self._lane_of(row["kind"])
            assert to is not None  # reserve() only names kinds of lanes with workers
            self._handed[to].append(row)
            self._wake_one(to)

    def _lane_of(self, kind: str) -> str | None:
        """The lane whose workers run ``kind``, or None (no lane, or a lane without workers)."""
        for lane, (kinds, workers) in self.lanes.items():
            if kind in kinds:
                return lane if workers > 0 else None
        return None

    def _free(self, lane: str) -> int:
        """Idle workers of ``lane`` not promised to a job yet (handed, announced or reserved)."""
        return (len(self._idle_workers[lane]) - len(self._handed[lane]) - self._announced[lane]
                - self._reserved[lane])

    def _wake_one(self, lane: str) -> None:
        waiters = self._idle_workers[lane]
        while waiters:
            waiter = waiters.pop()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def check(self) -> None:
        """Raise :class:`Backlogged` naming the oldest waiting media's age and deadline while the
        gateway cannot keep up (for ``/readyz``)."""
        if self.backlog is not None:
            raise Backlogged(self.backlog)

    async def check_backlog(self, now: float | None = None) -> str | None:
        """Look at the waiting media once: set :attr:`backlog` (and the backlog gauges), log one
        WARNING when the gateway falls behind and one INFO when it caught up. Returns
        :attr:`backlog`."""
        now = now if now is not None else time.time()
        self.admission.observe(await self.catalog.media_waiting())
        oldest = await self.catalog.media_backlog()
        problem = None
        if oldest is not None:
            created, deadline = oldest
            used = (now - created) / max(deadline - created, 1e-9)
            self.metrics.media_backlog_oldest.set(max(0.0, now - created))
            self.metrics.media_backlog_deadline_used.set(max(0.0, used))
            if used > self.settings.backlog_ready_fraction:
                problem = (f"the oldest waiting media is {now - created:.0f}s old; its provider may delete"
                           f" it {deadline - created:.0f}s after the webhook")
        else:
            self.metrics.media_backlog_oldest.set(0)
            self.metrics.media_backlog_deadline_used.set(0)
        if problem is not None and self.backlog is None:
            log.warning("media backlog: the gateway cannot keep up (%s); /readyz answers 503", problem)
        elif problem is None and self.backlog is not None:
            log.info("media backlog: caught up; /readyz answers 200 again")
        self.backlog = problem
        return problem

    async def _dead_letter_unknown(self) -> None:
        """Jobs of a kind no lane runs (left by another gateway version) go dead. At start, then
        every :data:`UNKNOWN_KINDS_EVERY` seconds: the claim excludes the known kinds, so it reads
        every queued job (a write transaction of 2.4 ms on SQLite with 126,000 jobs, 4.6 ms on
        PostgreSQL with 42,000 queued), where a lane's claim reads one."""
        now = time.monotonic()
        if self._unknown_checked is not None and now - self._unknown_checked < self.unknown_kinds_every:
            return
        self._unknown_checked = now
        known = tuple({*self.handlers, *FETCH_KINDS})
        while not self._stopping and (row := await self.catalog.claim_job(exclude_kinds=known)) is not None:
            await self._run(self._job(row))

    async def _release_unrecorded(self) -> None:
        """Queue again the jobs whose outcome the catalog could not record (see :meth:`_worker`)."""
        for job_id in sorted(self._unreleased):
            if job_id in self._running:  # its lease ran out meanwhile, and a worker here took it again
                self._unreleased.discard(job_id)
                continue
            await self.catalog.release_job(job_id)
            self._unreleased.discard(job_id)
            log.warning("job %s is back in the queue: the catalog answers again", job_id, extra={"job_id": job_id})

    async def _monitor(self) -> None:
        while not self._stopping:
            if self._unreleased:
                try:
                    await self._release_unrecorded()
                except Exception as exc:  # still down: the next round tries again
                    log.info("%d job(s) wait for the catalog to take them back: %s", len(self._unreleased), exc)
            try:
                await self._dead_letter_unknown()
                await self.check_backlog()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the catalog's own trouble shows in /readyz already
                log.info("media backlog: could not look (%s)", exc)
            await asyncio.sleep(min(self.settings.poll_interval, 1.0))

    async def start(self) -> None:
        """Requeue jobs a crash left running, then start the workers."""
        recovered = await self.catalog.requeue_running()
        if recovered:
            log.warning("requeued %d job(s) left running by an earlier crash", recovered)
        self._stopping = False
        self._workers = [asyncio.create_task(self._worker(lane, i), name=f"job-{lane}-{i}")
                         for lane, (kinds, count) in self.lanes.items() if kinds for i in range(count)]
        self._workers.append(asyncio.create_task(self._monitor(), name="job-backlog-monitor"))
        self._renewer = asyncio.create_task(self._renew_leases(), name="job-leases")

    async def stop(self, grace: float) -> None:
        """Take no new jobs; wait up to ``grace`` seconds for running ones, and for the jobs handed
        to this process's workers (:meth:`hand`) that no worker took yet: those are claimed here
        and their downloads may be under way (begun at their webhook's commit), so their workers
        take them even now; requeue the rest."""
        self._stopping = True
        for waiters in self._idle_workers.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._running or any(self._handed.values()):
            log.info("waiting up to %.0fs for %d running job(s)", grace,
                     len(self._running) + sum(len(h) for h in self._handed.values()))
        while (self._running or any(self._handed.values())) and (left := deadline - loop.time()) > 0:
            if self._running:  # a worker's task ends once it has no job left
                await asyncio.wait(list(self._running.values()), timeout=left, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(min(left, 0.01))  # a woken worker is about to take a handed job
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for handed in self._handed.values():  # claimed here, never started: back to the queue
            while handed:
                await self.catalog.release_job(handed.popleft()["id"])
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    async def _renew_leases(self) -> None:
        """Every third of the lease, extend the leases of the jobs running here."""
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            running = [*self._running, *(row["id"] for handed in self._handed.values() for row in handed)]
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

    async def _worker(self, lane: str, index: int) -> None:
        kinds = self.lanes[lane][0]
        claim = True  # whether the catalog may have a job for this worker now
        look = True  # whether waiting asks the catalog when its next job is due
        while not self._stopping or self._handed[lane]:  # handed jobs are taken even while stopping
            handed = bool(self._handed[lane])  # each handed job woke a worker of its own
            if not handed and not claim:
                woken = await self._idle(lane, kinds, look=look)
                # a wake-up with no announced job left: a busy worker took it meanwhile (jobs
                # nobody announced are found when a wait times out, or comes due)
                claim = not woken or self._announced[lane] > 0
                look = not woken
                continue
            announced = not handed and self._announced[lane] > 0
            if announced:
                self._announced[lane] -= 1  # this claim is for it: no other worker's is
            try:
                row = self._handed[lane].popleft() if handed else await self.catalog.claim_job(kinds=kinds)
            except Exception:
                log.exception("could not claim a job; retrying")
                await asyncio.sleep(self.settings.poll_interval)
                continue
            if row is None:
                self._announced[lane] = 0  # none due: every announced job was claimed (or is not due)
                self._due.pop(lane, None)  # nor is the one the shared answer said was due
                claim, look = False, True
                continue
            if not handed and not announced:
                self._wake_one(lane)  # there may be more: let the next idle worker look
            job = self._job(row)
            task = asyncio.current_task()
            assert task is not None
            self._running[job.id] = task
            try:
                await self._run(job)
            except asyncio.CancelledError:
                await asyncio.shield(self.catalog.release_job(job.id))
                log.info("job %s interrupted by shutdown; back in the queue", job.key)
                raise
            except Exception as exc:  # the catalog failed to record the outcome: an outage, not the job's fault
                log.error("job %s: the catalog could not record its outcome (%s: %s); it goes back to the "
                          "queue once the catalog answers", job.key, type(exc).__name__, exc,
                          extra={"job_id": job.id})
                self._unreleased.add(job.id)
            finally:
                self._running.pop(job.id, None)
            # claim again only for an announced job: else wait, asking the catalog when the next
            # job is due (at once if one is), which reads where a claim would write
            claim, look = self._announced[lane] > 0, True

    def _handoff_lane(self, followups: list[tuple[str, str, dict[str, Any]]]) -> str | None:
        """The lane whose workers here take ``followups`` straight from their parent's completion
        (claimed in its transaction: no claim, no wake-up through the catalog), or None to queue
        them: when they are not all of one running lane, or that lane has a worker's worth
        waiting already (the rest stay in the catalog for any replica)."""
        lanes = {lane for kind, _, _ in followups for lane, (kinds, _) in self.lanes.items() if kind in kinds}
        if len(lanes) != 1 or self._stopping:
            return None
        lane = lanes.pop()
        kinds, workers = self.lanes[lane]
        if not all(kind in kinds for kind, _, _ in followups):
            return None
        return lane if len(self._handed[lane]) + len(followups) <= workers else None

    def _job(self, row: ClaimedJob) -> Job:
        return Job(id=row["id"], kind=row["kind"], key=row["key"], payload=row["payload"],
                   attempts=row["attempts"], max_attempts=self.settings.max_attempts)

    async def _idle(self, lane: str, kinds: tuple[str, ...], look: bool = True) -> bool:
        """Wait until a wake-up (True) or until the next queued job of ``kinds`` is due, at most
        ``poll_interval`` seconds (False; at once when one is due already). ``look``: ask the
        catalog when that is (else wait the whole ``poll_interval``)."""
        timeout = self.settings.poll_interval
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_workers[lane].append(waiter)  # before the look, so that a notify after it is not lost
        try:
            nxt = await self._next_due(lane, kinds) if look else None
            if nxt is not None:
                if nxt <= time.time():
                    return False  # one is due now
                timeout = max(0.01, min(timeout, nxt - time.time()))
            try:
                await asyncio.wait_for(waiter, timeout)
                return True
            except TimeoutError:
                return False
        finally:
            if waiter in self._idle_workers[lane]:
                self._idle_workers[lane].remove(waiter)

    async def _next_due(self, lane: str, kinds: tuple[str, ...]) -> float | None:
        """When the next queued job of ``lane`` is due (epoch seconds) or None: the catalog's
        answer, shared for :data:`DUE_TTL` seconds (None when the catalog cannot say)."""
        cached = self._due.get(lane)
        if cached is not None and time.monotonic() - cached[0] < DUE_TTL:
            return cached[1]
        try:
            nxt = await self.catalog.next_run_at(kinds)
        except Exception:
            return None
        self._due[lane] = (time.monotonic(), nxt)
        return nxt

    async def _retry_at(self, job: Job, error: str, delay: float) -> None:
        """Queue ``job`` again in ``delay`` seconds, recording ``error``."""
        retry_at = time.time() + delay
        await self.catalog.fail_job(job.id, error, retry_at)
        for lane, (kinds, _) in self.lanes.items():
            cached = self._due.get(lane)
            if job.kind in kinds and cached is not None and (cached[1] is None or retry_at < cached[1]):
                self._due[lane] = (cached[0], retry_at)  # due sooner than the shared answer said

    async def _run(self, job: Job) -> None:
        handler = self.handlers.get(job.kind)
        started = time.monotonic()
        if handler is None:
            await self.catalog.fail_job(job.id, f"no handler for job kind {job.kind!r}", None)
            self.metrics.jobs_processed.labels(job.kind, "dead").inc()
            return
        result: JobResult | None
        try:
            result = await handler(job) or JobResult()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(job, exc)
            result = None
        finally:
            self.metrics.job_duration.labels(job.kind).observe(time.monotonic() - started)
        revisions = 0
        while result is not None:
            lane = self._handoff_lane(result.followups)
            try:
                claimed = await self.catalog.complete_job(job.id, result.followups, result.event_update,
                                                          claim=lane is not None, durable=not result.repeatable,
                                                          media=result.media)
            except MediaTaken as exc:
                revisions += 1
                log.info("job %s: %s; revising its result", job.key, exc, extra={"job_id": job.id})
                try:
                    if result.taken is None or revisions > MAX_REVISIONS:
                        raise RetryLater(str(exc)) from None
                    result = await result.taken(exc)
                except asyncio.CancelledError:
                    raise
                except Exception as failure:
                    await self._failed(job, failure)
                    result = None
                continue
            except Exception as exc:  # the catalog's trouble, not the job's: it runs again
                await self._failed(job, RetryLater(
                    f"its completion was not recorded: {type(exc).__name__}: {exc}"))
                result = None
                continue
            self._completed(job, result, lane, claimed)
            if result.after is not None:
                try:
                    await result.after()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("job %s is done, but what runs after it failed", job.key,
                                  extra={"job_id": job.id})
            return

    async def _failed(self, job: Job, exc: Exception) -> None:
        """Record that an attempt at ``job`` raised ``exc``: dead at once (:class:`PermanentError`),
        queued again after a backoff (:class:`RetryLater`: always; anything else: until the last
        attempt, then dead)."""
        if isinstance(exc, PermanentError):
            log.error("job %s failed for good: %s", job.key, exc, extra={"job_id": job.id})
            await self.catalog.fail_job(job.id, str(exc), None)
            self.metrics.jobs_processed.labels(job.kind, "dead").inc()
            return
        if isinstance(exc, RetryLater):
            delay = backoff_delay(job.attempts, self.settings.backoff_base, self.settings.backoff_max)
            log.warning("job %s deferred (%s); retry in %.1fs", job.key, exc, delay, extra={"job_id": job.id})
            await self._retry_at(job, f"deferred: {exc}", delay)
            self.metrics.jobs_processed.labels(job.kind, "retry").inc()
            return
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
            await self._retry_at(job, error, delay)
            self.metrics.jobs_processed.labels(job.kind, "retry").inc()

    def _completed(self, job: Job, result: JobResult, lane: str | None, claimed: list[ClaimedJob]) -> None:
        """Count a job whose completion committed and hand its claimed follow-ups to the workers
        of ``lane`` (or announce its queued ones)."""
        self.metrics.jobs_processed.labels(job.kind, "done").inc()
        if job.kind in FETCH_KINDS:
            self.admission.finished()
        if lane is not None:
            self._handed[lane].extend(claimed)
            for _ in claimed:
                self._wake_one(lane)
        elif result.followups:
            self.notify({kind for kind, _, _ in result.followups})
