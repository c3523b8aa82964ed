"""What a cleanup run did: :class:`CleanupReport` (the admin endpoint's answer, the run log's
``report``, the CLI's summary), the :class:`CleanupItem` s it handled and the :class:`Progress`
interface the CLI draws its progress bar from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_LISTED_IDS = 1000  # media ids a report lists (missing ones); the counts are always complete


@dataclass(slots=True)
class CleanupItem:
    """One object a run handled, for progress displays.

    ``action``: ``delete`` (deleted; in a dry run: would be), ``failed`` (delete failed, kept for
    the next run), ``missing`` (row marked missing), ``kept`` (expired but needed by a job),
    ``abort`` (an incomplete upload aborted; in a dry run: would be).
    ``reason``: ``age``, ``expires_at``, ``orphan``, ``missing`` or ``incomplete_upload``.
    ``size`` in bytes (0 for an incomplete upload).
    """

    action: str
    reason: str
    key: str
    size: int
    bucket: str | None = None
    media_id: str | None = None
    provider: str | None = None
    error: str | None = None


class Progress(Protocol):
    """Receives a run's progress (the CLI draws a progress bar from it)."""

    def phase(self, name: str, total: int | None) -> None:
        """A phase starts (``expired``, ``pending``, ``listing``, ``orphans``, ``missing``,
        ``uploads``, ``pruning``); ``total``: items it will handle, when known."""

    def item(self, item: CleanupItem) -> None:
        """One object was handled."""


class NoProgress:
    """A :class:`Progress` that ignores everything (a run without a display)."""

    def phase(self, name: str, total: int | None) -> None:
        pass

    def item(self, item: CleanupItem) -> None:
        pass


@dataclass(slots=True)
class CleanupReport:
    """What a run did (in a dry run: would have done). Times in epoch seconds, sizes in bytes.

    - ``now``: the policy clock's time; ``started_at``/``finished_at``: real time;
    - ``deleted``: ``{reason: {"objects": n, "bytes": n}}``, reasons ``age``, ``expires_at``,
      ``orphan``; ``rows_without_object``: deleted rows whose object was already gone;
    - ``failed``: deletes that failed (rows kept for the next run), ``errors``: the first messages;
    - ``kept_in_use``: expired objects kept because a queued or running job needs them;
    - ``missing``: rows marked missing (``missing_ids``: the first :data:`MAX_LISTED_IDS`);
    - ``listed``: objects the storage listed (None without ``reconcile``); ``orphans_in_grace``:
      orphans younger than the grace period; ``foreign_objects``: keys without a media id, left alone;
    - ``aborted_uploads``: incomplete uploads aborted (in a dry run: that would be);
      ``uploads_in_grace``: the gateway's incomplete uploads younger than the grace period (they may
      still be going on); None for backends without incomplete uploads;
    - ``pruned``: ``{"events": n, "jobs": n}``;
    - ``error``: why the run stopped early (storage or catalog unavailable), else None.
    """

    dry_run: bool
    trigger: str
    backend: str
    now: float
    started_at: float
    finished_at: float | None = None
    deleted: dict[str, dict[str, int]] = field(default_factory=dict)
    rows_without_object: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    kept_in_use: int = 0
    missing: int = 0
    missing_ids: list[str] = field(default_factory=list)
    listed: int | None = None
    orphans_in_grace: int = 0
    foreign_objects: int = 0
    aborted_uploads: int | None = None
    uploads_in_grace: int | None = None
    pruned: dict[str, int] = field(default_factory=lambda: {"events": 0, "jobs": 0})
    error: str | None = None

    @property
    def objects(self) -> int:
        """Objects deleted (or that would be), all reasons."""
        return sum(d["objects"] for d in self.deleted.values())

    @property
    def bytes(self) -> int:
        """Bytes deleted (or that would be), all reasons."""
        return sum(d["bytes"] for d in self.deleted.values())

    def count_deleted(self, reason: str, size: int) -> None:
        """Add one deleted object of ``size`` bytes."""
        entry = self.deleted.setdefault(reason, {"objects": 0, "bytes": 0})
        entry["objects"] += 1
        entry["bytes"] += size

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (the admin endpoint's answer), with ``objects`` and ``bytes`` totals."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["objects"], data["bytes"] = self.objects, self.bytes
        return data
