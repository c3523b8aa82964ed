"""Admission of media webhooks: acknowledge only the media the fetch lane can store before its
provider deletes it (issue 12; DESIGN §6).

A provider deletes a webhook's media some time after sending it (WAHA: 180 s,
``WHATSAPP_FILES_LIFETIME``; ``[queue] media_deadline``/``media_deadlines``). A 200 tells the
provider the media is ours to fetch, so acknowledging more than the fetch lane can store in time
loses media. The estimate of the time to store what was acknowledged::

    estimate = waiting ingest jobs / recent store rate   (seconds)

- *waiting*: the catalog's queued and running ``ingest`` jobs (:meth:`CatalogContract.media_waiting`),
  read by the backlog monitor once a second, plus the webhooks admitted here since, minus the
  ingest jobs this process finished since;
- *store rate*: ingest jobs this process finished per second over the last
  :data:`RATE_WINDOW` seconds *while the fetch lane was saturated* (at least ``fetch_workers``
  jobs waiting), so it measures what the lane can do rather than what arrived. At least one job
  per window is assumed, so a stalled lane estimates a long time rather than none. Until the lane
  has been saturated for :data:`MIN_SPAN` seconds the last measured rate stands; before any, there
  is none, and media webhooks are admitted.

A media webhook of provider P is admitted while ``estimate <= admission_fraction ×
media_deadline(P)``. The rest of the deadline is the margin for the time a provider's retries
take: a webhook held back and sent again later has less of its media's lifetime left (the
provider's clock started at its first attempt). Otherwise the request waits up to
``admission_hold`` seconds for room, then is answered 503 with ``Retry-After`` (RFC 9110 §10.2.3;
WAHA and Meta retry webhooks that are not answered 2xx). Webhooks without media are always
admitted: they lose nothing. The first 503 logs one WARNING; one INFO follows when the estimate is
back under half the threshold (:data:`CAUGHT_UP`), not one per request.

With several replicas sharing a catalog, *waiting* counts every replica's jobs but the rate is this
replica's: the estimate is pessimistic by the number of replicas (it refuses early, never late).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from gateway.config import QueueSettings
from gateway.metrics import Metrics

log = logging.getLogger("gateway.admission")

RATE_WINDOW = 10.0
"""Seconds of saturated fetch lane over which the store rate is measured."""

MIN_SPAN = 0.5
"""Seconds the fetch lane must have been saturated before its rate is measured."""

CAUGHT_UP = 0.5
"""A provider held back is caught up (one INFO line, gauge 0) once the estimate is below this
share of its threshold; in between, webhooks are admitted whenever there is room, without a log
line each time the estimate crosses the threshold."""

MAX_RETRY_AFTER = 10
"""The longest ``Retry-After`` given, seconds: a held-back webhook's media keeps ageing."""


class Admission:
    """Decides whether a media webhook may be acknowledged now (see the module docstring).

    ``lifetime(provider)``: seconds after a webhook that the provider may delete its media.
    ``clock``: monotonic seconds.
    """

    def __init__(self, settings: QueueSettings, metrics: Metrics, lifetime: Callable[[str], float],
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.metrics = metrics
        self.lifetime = lifetime
        self.clock = clock
        #: the catalog's waiting ingest jobs at the last :meth:`observe`, plus admitted, minus finished since
        self.waiting = 0
        #: ingest jobs stored per second by the saturated fetch lane (the last measured), or None
        self.rate: float | None = None
        self._busy_since: float | None = None  # when the lane became saturated; None: it is not
        self._done: deque[float] = deque()  # clock of each finished job since then, the last RATE_WINDOW s
        self._holding: set[str] = set()  # providers whose media webhooks are answered 503
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []  # (threshold seconds, wake-up)

    def estimate(self) -> float:
        """Seconds the fetch lane needs to store the waiting media; 0 while no rate is known."""
        if self.rate is None or self.waiting <= 0:
            return 0.0
        return self.waiting / self.rate

    def threshold(self, provider: str) -> float:
        """The largest :meth:`estimate` (seconds) at which ``provider``'s media webhooks are admitted."""
        return self.settings.admission_fraction * self.lifetime(provider)

    def _measure(self, now: float) -> None:
        """Track whether the lane is saturated and, after :data:`MIN_SPAN` seconds of it, its rate."""
        if self.waiting < self.settings.fetch_workers:  # completions follow arrivals, not capacity
            self._busy_since = None
            self._done.clear()
            return
        if self._busy_since is None:
            self._busy_since = now
        while self._done and now - self._done[0] > RATE_WINDOW:
            self._done.popleft()
        span = min(RATE_WINDOW, now - self._busy_since)
        if span >= MIN_SPAN:
            self.rate = max(len(self._done), 1) / span

    def finished(self) -> None:
        """An ingest job of this process is done: one waiting media less."""
        now = self.clock()
        if self._busy_since is not None:
            self._done.append(now)
        self.waiting = max(0, self.waiting - 1)
        self._measure(now)
        if self._waiters:
            self._wake()

    def observe(self, waiting: int) -> None:
        """The backlog monitor's look (once a second): the catalog counts ``waiting`` queued or
        running ingest jobs. Updates the store rate, the gauges, and logs when a provider's media
        webhooks are no longer held back."""
        self.waiting = waiting
        self._measure(self.clock())
        estimate = self.estimate()
        self.metrics.media_store_estimate.set(estimate)
        for provider in list(self._holding):
            if estimate <= self.threshold(provider) * CAUGHT_UP:
                self._holding.discard(provider)
                self.metrics.media_admission_holding.labels(provider).set(0)
                log.info("media webhooks of %s: caught up (storing the %d waiting media would take about "
                         "%.0fs); none is held back", provider, self.waiting, estimate,
                         extra={"provider": provider})
        self._wake()

    async def admit(self, provider: str, jobs: int = 1) -> int | None:
        """Admit a webhook of ``provider`` with media (``jobs``: the ingest jobs it adds): None when
        it may be committed (counted as waiting at once), else the ``Retry-After`` seconds of its 503.
        Waits up to ``admission_hold`` seconds for room first."""
        threshold = self.threshold(provider)
        if self.estimate() > threshold and self.settings.admission_hold > 0:
            loop = asyncio.get_running_loop()
            until = loop.time() + self.settings.admission_hold
            while self.estimate() > threshold and (left := until - loop.time()) > 0:
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((threshold, waiter))
                try:
                    await asyncio.wait_for(waiter, left)
                except TimeoutError:
                    pass
                finally:
                    self._waiters = [w for w in self._waiters if w[1] is not waiter]
        estimate = self.estimate()
        if estimate > threshold:
            if provider not in self._holding:
                self._holding.add(provider)
                self.metrics.media_admission_holding.labels(provider).set(1)
                log.warning("media webhooks of %s held back (503 + Retry-After): storing the %d waiting media "
                            "would take about %.0fs at %.1f/s, over %.0fs (admission_fraction %.2f of the "
                            "%.0fs media deadline)", provider, self.waiting, estimate, self.rate or 0.0,
                            threshold, self.settings.admission_fraction, self.lifetime(provider),
                            extra={"provider": provider})
            return max(1, min(MAX_RETRY_AFTER, math.ceil(estimate - threshold)))
        self.waiting += jobs
        self._measure(self.clock())
        return None

    def _wake(self) -> None:
        estimate = self.estimate()
        for threshold, waiter in self._waiters:
            if estimate <= threshold and not waiter.done():
                waiter.set_result(None)
