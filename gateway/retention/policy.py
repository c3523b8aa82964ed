"""What expires (README "Retention"): a stored object's maximum age from the ``[retention]``
settings, and the catalog query's form of them (:class:`gateway.catalog.ExpiryRule`). Ages in
seconds, ``math.inf`` for "forever"."""

from __future__ import annotations

import math

from gateway.catalog import ExpiryRule
from gateway.config import MaxAgeDays, RetentionSettings

DAY = 86400.0


def age_seconds(days: MaxAgeDays) -> float:
    """An age setting in seconds (``"forever"``: ``math.inf``)."""
    return math.inf if days == "forever" else float(days) * DAY


def max_age_seconds(settings: RetentionSettings, provider: str | None, category: str) -> float:
    """The maximum age, in seconds (``math.inf``: kept), of an object of ``provider`` and
    ``category``: the longest of the provider's and the category's ages when either is set, else
    ``max_age_days``. The same rule :meth:`gateway.catalog.Catalog.expired_media` applies in SQL."""
    rules = [age_seconds(a) for a in (settings.provider_max_age_days.get(provider or ""),
                                      settings.category_max_age_days.get(category)) if a is not None]
    return max(rules) if rules else age_seconds(settings.max_age_days)


def expiry_rule(settings: RetentionSettings, backend: str, now: float, before: float) -> ExpiryRule:
    """The catalog query's form of ``settings`` for a run on ``backend`` at policy time ``now``
    that leaves alone rows created at or after ``before`` (epoch seconds)."""
    return ExpiryRule(
        backend=backend, now=now, before=before, default_age=age_seconds(settings.max_age_days),
        provider_ages={k: age_seconds(v) for k, v in settings.provider_max_age_days.items()},
        category_ages={k: age_seconds(v) for k, v in settings.category_max_age_days.items()},
        keep_public=settings.keep_public,
    )
