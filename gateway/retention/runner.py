"""Retention cleanup (DESIGN §2 "scheduler ──cron──▶ retention cleanup", §5): storage must not
grow without bound.

One run, in this order (``[retention]`` in :class:`gateway.config.RetentionSettings` has the knobs):

1. **Unfinished deletions.** Rows an earlier run claimed but could not finish (a failed delete, a
   crash) are deleted now: object first, then row.
2. **Expired objects.** A stored object goes when its ``expires_at`` has passed, or when it is
   older than its maximum age (the longest of its provider's and its category's age when either is
   set, else ``max_age_days``; public objects are kept with ``keep_public``). An expired object
   that a queued or running job still needs is kept (see :class:`gateway.catalog.CatalogContract`: the
   jobs' events refer to it by ``source_key``, or it was stored for such an event); claiming a row
   and checking that happen in one transaction. Each claimed object is deleted from storage first,
   then its row; a failed delete leaves the row (state ``deleting``) for the next run.
3. **Reconciliation** (``reconcile``): the storage is listed into a temporary table. Objects
   without a row (left by a crash between storing and cataloguing) are deleted once older than
   ``orphan_grace_hours``, and only when their key holds a gateway media id (``m_`` + 27 hex
   digits), so foreign objects in a shared bucket are left alone (and counted). A thumbnail
   (:mod:`gateway.thumbnails`) is kept while its original has a row. Rows whose object
   is not in storage are marked ``missing`` and reported (logged with their media id); they no
   longer count as stored, and the attachment is fetched again if it comes back.
4. **Incomplete uploads** (backends with :class:`gateway.sdk.storage.IncompleteUploads`, such as
   multipart uploads): uploads neither completed nor aborted, whose key holds a media id, started
   more than ``orphan_grace_hours`` ago (and before the run started), are aborted. A crash or an
   outage in the middle of an upload leaves them; they hold space but are no object.
5. **Pruning.** Events older than ``events_max_age_days`` whose jobs are all done are deleted with
   their jobs; done jobs older than ``done_jobs_max_age_days`` too. Dead jobs are kept.

Time: policy ages are measured against an injected ``clock`` (epoch seconds; tests move it instead
of sleeping). Independently, a run never touches rows created, nor objects modified, after it
started (real time), so what an ingest stores while a run goes on is never part of it.

One run at a time: an :class:`asyncio.Lock` in the process, an exclusive ``flock`` on
``<catalog>.cleanup-lock`` across processes on the host (the daemon and ``gateway cleanup``), and
the catalog's :meth:`~gateway.catalog.CatalogContract.try_cleanup_lock` across replicas (PostgreSQL:
an advisory lock). A second run raises :class:`CleanupBusy`. Every replica runs the schedule; the
scheduled run happens once per due time: a replica that finds the run of that minute already
logged in ``cleanup_runs`` (another replica did it) skips it. The schedule runs on APScheduler 3's :class:`AsyncIOScheduler` with a
:class:`CronTrigger` (:func:`crontab_trigger`), started and stopped in the app's cleanup_ctx.

This module is the run; :mod:`.policy` says what expires, :mod:`.report` what a run reports and
:mod:`.cron` reads the schedule. The catalog's queries are in :mod:`gateway.catalog.sqlite.retention` and
:mod:`gateway.catalog.postgres.retention`.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pluggy
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gateway.catalog import CatalogContract, DoomedMedia
from gateway.config import MaxAgeDays, Settings
from gateway.cron import crontab_trigger
from gateway.metrics import Metrics
from gateway.plugins import notify
from gateway.retention.policy import age_seconds, expiry_rule
from gateway.retention.report import (
    MAX_LISTED_IDS,
    CleanupItem,
    CleanupReport,
    NoProgress,
    Progress,
)
from gateway.sdk.storage import IncompleteUploads, StorageBackend, StorageError
from gateway.thumbnails import delete_thumbnails, original_key

if TYPE_CHECKING:
    from gateway.store import MediaRows

log = logging.getLogger("gateway.retention")

Clock = Callable[[], float]
"""Returns the current time in epoch seconds (``time.time`` in production)."""

MEDIA_ID = re.compile(r"(?<![0-9a-z])m_[0-9a-f]{27}(?![0-9a-f])")
"""A media id as :func:`gateway.media.new_media_id` makes it; every object key holds one."""
DELETE_CONCURRENCY = 8


class CleanupBusy(Exception):
    """Another cleanup run is in progress, in this process or another (HTTP 409; CLI exit 3)."""


class AlreadyRun(CleanupBusy):
    """The scheduled run of this due time is done, or being done, by another replica."""


class _LockFile:
    """An exclusive, non-blocking ``flock`` on ``path`` (released when the process dies)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CleanupBusy(f"another process is running a cleanup (it holds {self.path})") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Retention:
    """Runs retention cleanups over ``catalog`` and ``storage`` under ``settings.retention``:
    on the schedule (:meth:`start_scheduler`), from the admin endpoint (:meth:`spawn`), or once
    (:meth:`run`, as ``gateway cleanup`` does). ``clock`` gives the policy's "now" (epoch seconds).
    """

    def __init__(self, settings: Settings, catalog: CatalogContract, storage: StorageBackend, metrics: Metrics,
                 clock: Clock = time.time, pm: pluggy.PluginManager | None = None, rows: MediaRows | None = None):
        self.pm = pm  # fires media_deleted for each deleted object when given
        self.rows = rows  # the daemon's served rows: forgets the rows it deletes
        self.settings = settings.retention
        self.catalog = catalog
        self.storage = storage
        self.metrics = metrics
        self.clock = clock
        self.lock_path = settings.catalog.path.with_name(settings.catalog.path.name + ".cleanup-lock")
        self.scheduler: AsyncIOScheduler | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[CleanupReport]] = set()

    @property
    def running(self) -> bool:
        """True while this process runs a cleanup."""
        return self._lock.locked()

    # -- scheduling ---------------------------------------------------------------------------
    def start_scheduler(self) -> None:
        """Start the cron schedule (when ``enabled``). Call from a running event loop."""
        s = self.settings
        if not s.enabled:
            log.info("retention schedule disabled ([retention] enabled = false)")
            return
        self.scheduler = AsyncIOScheduler(timezone=ZoneInfo(s.timezone))
        job = self.scheduler.add_job(self._scheduled, crontab_trigger(s.schedule, s.timezone), id="retention",
                                     name="retention cleanup", coalesce=True, max_instances=1,
                                     misfire_grace_time=3600)
        self.scheduler.start()
        log.info("retention cleanup scheduled (%s, %s); next run at %s", s.schedule, s.timezone,
                 job.next_run_time.isoformat() if job.next_run_time else "never")

    async def stop(self) -> None:
        """Stop the schedule and cancel a run in progress (its claimed rows wait for the next run)."""
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # AsyncIOScheduler finishes shutting down in a loop callback
        self.scheduler = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _scheduled(self) -> None:
        due = time.time() // 60 * 60  # cron's resolution: the minute this run is for
        try:
            await self.spawn(trigger="schedule", once_since=due)
        except AlreadyRun as exc:
            log.info("scheduled cleanup skipped: %s", exc)
        except CleanupBusy as exc:
            log.warning("scheduled cleanup skipped: %s", exc)

    def spawn(self, *, dry_run: bool = False, trigger: str = "api",
              once_since: float | None = None) -> asyncio.Task[CleanupReport]:
        """Start :meth:`run` as a task of its own, so that a caller that goes away (an HTTP client
        hanging up) does not interrupt it: await it through :func:`asyncio.shield`.

        Raises :class:`CleanupBusy` at once if this process is already running one (the task
        raises it if another process is).
        """
        if self.running:
            self.metrics.cleanup_runs.labels(trigger, "busy").inc()
            raise CleanupBusy("a cleanup run is already in progress")
        task = asyncio.create_task(self.run(dry_run=dry_run, trigger=trigger, once_since=once_since),
                                   name="retention-cleanup")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- one run ------------------------------------------------------------------------------
    async def run(self, *, dry_run: bool = False, trigger: str = "cli",
                  progress: Progress | None = None, once_since: float | None = None) -> CleanupReport:
        """Run one cleanup and return its report. ``dry_run``: change nothing, report what would go.

        ``trigger`` (``schedule``, ``api``, ``cli``) labels metrics and the run log. Raises
        :class:`CleanupBusy` if a run is in progress (here, in another process, or on another
        replica); with ``once_since`` (epoch seconds), :class:`AlreadyRun` if a run with the same
        ``trigger`` started at or after it (the schedule's run of one due time happens once, on
        whichever replica gets there first). Storage or catalog failures stop the run early and
        are reported in ``report.error`` (what was done stays done).
        """
        if self._lock.locked():
            self.metrics.cleanup_runs.labels(trigger, "busy").inc()
            raise CleanupBusy("a cleanup run is already in progress")
        async with self._lock:
            lock = _LockFile(self.lock_path)
            try:
                lock.acquire()
            except CleanupBusy:
                self.metrics.cleanup_runs.labels(trigger, "busy").inc()
                raise
            try:
                async with self.catalog.try_cleanup_lock() as held:
                    if not held:
                        self.metrics.cleanup_runs.labels(trigger, "busy").inc()
                        if once_since is not None:  # the schedule fired on every replica: one runs it
                            raise AlreadyRun("another replica is running the scheduled cleanup")
                        raise CleanupBusy("another replica is running a cleanup")
                    if once_since is not None and any(
                            r["trigger"] == trigger and r["started_at"] >= once_since
                            for r in await self.catalog.cleanup_runs(limit=10)):
                        raise AlreadyRun(f"the {trigger} run due at {once_since:.0f} is done (another replica)")
                    return await self._run(dry_run, trigger, progress or NoProgress())
            finally:
                lock.release()

    async def _run(self, dry_run: bool, trigger: str, progress: Progress) -> CleanupReport:
        report = CleanupReport(dry_run=dry_run, trigger=trigger, backend=self.storage.name, now=self.clock(),
                               started_at=time.time())
        started = time.monotonic()
        self.metrics.cleanup_in_progress.set(1)
        log.info("cleanup started (%s%s)", trigger, ", dry run" if dry_run else "")
        try:
            await self._unfinished(report, progress)
            await self._expired(report, progress)
            if self.settings.reconcile:
                await self._reconcile(report, progress)
            if isinstance(self.storage, IncompleteUploads):
                await self._incomplete_uploads(self.storage, report, progress)
            await self._prune(report, progress)
        except asyncio.CancelledError:
            report.error = "cancelled"
            raise
        except Exception as exc:  # storage or catalog gone: report it, keep what was done
            report.error = f"{type(exc).__name__}: {exc}"
            log.exception("cleanup stopped early: %s", report.error)
        finally:
            report.finished_at = time.time()
            self.metrics.cleanup_in_progress.set(0)
            self.metrics.cleanup_duration.observe(time.monotonic() - started)
            outcome = "error" if report.error else ("dry_run" if dry_run else "ok")
            self.metrics.cleanup_runs.labels(trigger, outcome).inc()
        if not dry_run:
            try:
                await self.catalog.record_cleanup_run(trigger, report.started_at, report.finished_at,
                                                      report.error is None, report.to_dict())
            except Exception:
                log.exception("could not record the cleanup run in the catalog")
        log.info("cleanup %s: %s %d object(s), %d bytes; %d kept in use, %d failed, %d missing, "
                 "pruned %d event(s) and %d job(s)", "failed" if report.error else "done",
                 "would delete" if dry_run else "deleted", report.objects, report.bytes, report.kept_in_use,
                 report.failed, report.missing, report.pruned["events"], report.pruned["jobs"])
        return report

    async def _unfinished(self, report: CleanupReport, progress: Progress) -> None:
        after, announced = "", False
        while rows := await self.catalog.media_being_deleted(self.storage.name, after, self.settings.batch_size):
            if not announced:
                progress.phase("pending", None)
                announced = True
            after = rows[-1]["id"]
            await self._delete_rows(report, rows, progress)

    async def _expired(self, report: CleanupReport, progress: Progress) -> None:
        rule = expiry_rule(self.settings, self.storage.name, report.now, report.started_at)
        total, in_use, _ = await self.catalog.count_expired_media(rule)
        progress.phase("expired", total - in_use)
        after = ""
        while rows := await self.catalog.expired_media(rule, after, self.settings.batch_size,
                                                        claim=not report.dry_run):
            after = rows[-1]["id"]
            doomed = []
            for row in rows:
                if row["in_use"]:
                    report.kept_in_use += 1
                    log.info("expired media %s kept: a queued or running job needs it", row["id"],
                             extra={"media_id": row["id"], "provider": row["provider"]})
                    progress.item(CleanupItem("kept", row["reason"], row["key"], row["size"], row["bucket"],
                                              row["id"], row["provider"]))
                else:
                    doomed.append(row)
            await self._delete_rows(report, doomed, progress)

    async def _delete_rows(self, report: CleanupReport, rows: Sequence[DoomedMedia], progress: Progress) -> None:
        """Delete the objects of claimed rows, then the rows of those that went (a dry run counts)."""
        if report.dry_run:
            for row in rows:
                report.count_deleted(row["reason"], row["size"])
                progress.item(CleanupItem("delete", row["reason"], row["key"], row["size"], row["bucket"],
                                          row["id"], row["provider"]))
            return
        if self.rows is not None:  # claimed already: forgotten before their objects go
            self.rows.forget(row["id"] for row in rows)
        slots = asyncio.Semaphore(DELETE_CONCURRENCY)
        done: list[tuple[DoomedMedia, bool]] = []

        async def delete(row: DoomedMedia) -> None:
            extra = {"media_id": row["id"], "provider": row["provider"]}
            async with slots:
                try:
                    existed = await self.storage.delete(row["key"], bucket=row["bucket"])
                    await delete_thumbnails(self.storage, row)
                except StorageError as exc:
                    self._failed(report, row["key"], exc, extra)
                    progress.item(CleanupItem("failed", row["reason"], row["key"], row["size"], row["bucket"],
                                              row["id"], row["provider"], str(exc)))
                    return
            done.append((row, existed))

        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(delete(row))
        await self.catalog.forget_media([row["id"] for row, _ in done])
        if self.pm is not None:
            for row, _ in done:
                await notify(self.pm, "media_deleted", record=row)
        for row, existed in done:
            size = row["size"] if existed else 0
            report.count_deleted(row["reason"], size)
            if not existed:
                report.rows_without_object += 1
            self._count_metric(row["reason"], size)
            log.debug("deleted media %s (%s, %d bytes) at %s", row["id"], row["reason"], row["size"], row["key"],
                      extra={"media_id": row["id"], "provider": row["provider"]})
            progress.item(CleanupItem("delete", row["reason"], row["key"], size, row["bucket"], row["id"],
                                      row["provider"]))

    def _failed(self, report: CleanupReport, key: str, exc: Exception, extra: dict[str, Any]) -> None:
        report.failed += 1
        if len(report.errors) < 20:
            report.errors.append(f"{key}: {exc}")
        self.metrics.cleanup_failures.labels(self.storage.name).inc()
        log.warning("could not delete %s (kept for the next run): %s", key, exc, extra=extra)

    def _count_metric(self, reason: str, size: int) -> None:
        self.metrics.cleanup_deleted.labels(self.storage.name, reason).inc()
        self.metrics.cleanup_deleted_bytes.labels(self.storage.name, reason).inc(size)

    async def _reconcile(self, report: CleanupReport, progress: Progress) -> None:
        batch_size, backend = self.settings.batch_size, self.storage.name
        progress.phase("listing", None)
        listing_started = time.time()
        await self.catalog.begin_listing()
        try:
            batch: list[tuple[str, str, int, float]] = []
            report.listed = 0
            async for st in self.storage.list(""):
                batch.append((st.metadata.get("bucket") or "", st.key, st.size, st.modified))
                if len(batch) >= batch_size:
                    await self.catalog.add_listing(batch)
                    report.listed += len(batch)
                    batch = []
            if batch:
                await self.catalog.add_listing(batch)
                report.listed += len(batch)
            await self._orphans(report, progress)
            progress.phase("missing", None)
            after = ""
            while rows := await self.catalog.rows_not_listed(backend, listing_started, after, batch_size):
                after = rows[-1]["id"]
                if not report.dry_run:
                    await self.catalog.mark_missing([r["id"] for r in rows], report.now)
                for row in rows:
                    report.missing += 1
                    if len(report.missing_ids) < MAX_LISTED_IDS:
                        report.missing_ids.append(row["id"])
                    log.warning("media %s: object %s is not in storage%s", row["id"], row["key"],
                                "" if report.dry_run else "; marked missing",
                                extra={"media_id": row["id"], "provider": row["provider"],
                                       "event_id": row["event_id"]})
                    progress.item(CleanupItem("missing", "missing", row["key"], row["size"], row["bucket"],
                                              row["id"], row["provider"]))
        finally:
            await self.catalog.end_listing()

    async def _orphans(self, report: CleanupReport, progress: Progress) -> None:
        """Delete listed objects that no row points at, older than the grace period (real time
        too: nothing modified after the run started), whose key holds a media id."""
        progress.phase("orphans", None)
        cutoff = min(report.now - self.settings.orphan_grace_hours * 3600, report.started_at)
        after = ("", "")
        while rows := await self.catalog.listed_without_row(self.storage.name, after, self.settings.batch_size):
            after = (rows[-1][0], rows[-1][1])
            candidates = []
            for bucket, key, size, modified in rows:
                if not MEDIA_ID.search(key):
                    report.foreign_objects += 1
                elif modified >= cutoff:
                    report.orphans_in_grace += 1
                else:
                    candidates.append((bucket, key, size))
            if not candidates:
                continue
            # a row may have been written since the listing: those are not orphans; a thumbnail
            # belongs to its original's row
            owner = {(b, k): (b, original_key(k) or k) for b, k, _ in candidates}
            present = await self.catalog.media_keys_present(self.storage.name, list(set(owner.values())))
            for bucket, key, size in candidates:
                if owner[(bucket, key)] in present:
                    continue
                media_id = MEDIA_ID.search(key).group(0)  # type: ignore[union-attr]
                extra = {"media_id": media_id}
                if not report.dry_run:
                    try:
                        await self.storage.delete(key, bucket=bucket or None)
                    except StorageError as exc:
                        self._failed(report, key, exc, extra)
                        continue
                    self._count_metric("orphan", size)
                    log.info("deleted orphan %s (%d bytes): no catalog row", key, size, extra=extra)
                report.count_deleted("orphan", size)
                progress.item(CleanupItem("delete", "orphan", key, size, bucket or None, media_id))

    async def _incomplete_uploads(self, storage: IncompleteUploads, report: CleanupReport,
                                  progress: Progress) -> None:
        """Abort the gateway's incomplete uploads (key with a media id) older than the grace period."""
        progress.phase("uploads", None)
        report.aborted_uploads, report.uploads_in_grace = 0, 0
        cutoff = min(report.now - self.settings.orphan_grace_hours * 3600, report.started_at)
        async for upload in storage.incomplete_uploads(""):
            found = MEDIA_ID.search(upload.key)
            if found is None:
                continue  # not the gateway's
            if upload.started >= cutoff:
                report.uploads_in_grace += 1
                continue
            extra = {"media_id": found.group(0)}
            if not report.dry_run:
                try:
                    await storage.abort_upload(upload)
                except StorageError as exc:
                    self._failed(report, upload.key, exc, extra)
                    continue
                self.metrics.cleanup_aborted_uploads.labels(self.storage.name).inc()
                log.info("aborted incomplete upload %s of %s (started %s)", upload.upload_id, upload.key,
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(upload.started)), extra=extra)
            report.aborted_uploads += 1
            progress.item(CleanupItem("abort", "incomplete_upload", upload.key, 0, upload.bucket, found.group(0)))

    async def _prune(self, report: CleanupReport, progress: Progress) -> None:
        s = self.settings
        progress.phase("pruning", None)

        def before(days: MaxAgeDays) -> float | None:
            age = age_seconds(days)
            return None if math.isinf(age) else min(report.now - age, report.started_at)

        events_before, jobs_before = before(s.events_max_age_days), before(s.done_jobs_max_age_days)
        if report.dry_run:
            events, jobs = await self.catalog.count_prunable(events_before, jobs_before)
            report.pruned = {"events": events, "jobs": jobs}
            return
        if events_before is not None:
            while True:
                events, jobs = await self.catalog.prune_events(events_before, s.batch_size)
                report.pruned["events"] += events
                report.pruned["jobs"] += jobs
                if events == 0:
                    break
        if jobs_before is not None:
            while jobs := await self.catalog.prune_done_jobs(jobs_before, s.batch_size):
                report.pruned["jobs"] += jobs
        self.metrics.cleanup_pruned.labels("events").inc(report.pruned["events"])
        self.metrics.cleanup_pruned.labels("jobs").inc(report.pruned["jobs"])
