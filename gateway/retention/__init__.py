"""Retention cleanup (DESIGN §2 "scheduler ──cron──▶ retention cleanup", §5): storage must not grow
without bound. :mod:`.cron` reads the crontab schedule (a leaf), :mod:`.policy` says what expires,
:mod:`.runner` runs a cleanup (:class:`Retention`), :mod:`.report` is what a run reports.
"""

from gateway.cron import crontab_trigger
from gateway.retention.policy import DAY, age_seconds, expiry_rule, max_age_seconds
from gateway.retention.report import MAX_LISTED_IDS, CleanupItem, CleanupReport, NoProgress, Progress
from gateway.retention.runner import DELETE_CONCURRENCY, MEDIA_ID, AlreadyRun, CleanupBusy, Clock, Retention

__all__ = [
    "DAY", "DELETE_CONCURRENCY", "MAX_LISTED_IDS", "MEDIA_ID", "AlreadyRun", "CleanupBusy", "CleanupItem", "CleanupReport",
    "Clock", "NoProgress", "Progress", "Retention", "age_seconds", "crontab_trigger", "expiry_rule",
    "max_age_seconds",
]
