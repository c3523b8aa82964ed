"""Crontab lines for APScheduler 3 (the ``[retention] schedule`` setting). A leaf: it imports
nothing from the gateway, so :mod:`gateway.config` validates the setting with it."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 (and 7) = Sunday


def _weekday(token: str, *, upper: bool = False) -> int:
    token = token.strip().lower()
    if token.isdigit():
        value = int(token)
        if not 0 <= value <= 7:
            raise ValueError(f"day of week {token} is not 0-7")
        return value if upper else value % 7
    if token[:3] in _WEEKDAYS and len(token) == 3:
        value = _WEEKDAYS.index(token)
        return 7 if upper and value == 0 else value
    raise ValueError(f"day of week {token!r} is not 0-7 or sun..sat")


def _crontab_weekdays(spec: str) -> str:
    """Crontab's day-of-week field as day names, the only unambiguous form for APScheduler 3,
    whose numbers start at Monday (https://github.com/agronholm/apscheduler/issues/286)."""
    if spec == "*":
        return "*"
    days: set[int] = set()
    for part in spec.split(","):
        span, slash, step_text = part.partition("/")
        try:
            step = int(step_text) if slash else 1
        except ValueError:
            raise ValueError(f"day of week step {step_text!r} is not a number") from None
        if step < 1:
            raise ValueError("day of week step must be at least 1")
        if span == "*":
            low, high = 0, 7
        elif "-" in span:
            a, b = span.split("-", 1)
            low, high = _weekday(a), _weekday(b, upper=True)
        else:
            low = _weekday(span)
            high = 7 if slash else low  # "1/2": from Monday to the end of the week, as cronie reads it
        if low > high:
            raise ValueError(f"day of week range {span!r} runs backwards")
        days.update(d % 7 for d in range(low, high + 1, step))
    return ",".join(_WEEKDAYS[d] for d in sorted(days))


def crontab_trigger(expr: str, timezone: str = "UTC") -> CronTrigger:
    """An APScheduler :class:`CronTrigger` for a standard five-field crontab line ``expr``
    (minute, hour, day of month, month, day of week; crontab(5) numbering: 0 or 7 = Sunday, or
    names ``sun``..``sat``), read in the IANA ``timezone``.

    Raises ``ValueError`` for a malformed line, and for one that restricts both the day of month
    and the day of week (cron runs when either matches, APScheduler only when both do: say one).
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"a crontab line has 5 fields (minute hour day-of-month month day-of-week), "
                         f"got {len(fields)}")
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        raise ValueError("restrict the day of month or the day of week, not both")
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_crontab_weekdays(weekday), timezone=ZoneInfo(timezone))
