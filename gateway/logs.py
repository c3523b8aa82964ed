"""Logging setup: one JSON object a line when stderr is not a terminal (DESIGN §9), readable text
on a terminal. Records carry ``event_id``, ``provider`` and ``media_id`` when the caller passes
them in ``extra``.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from gateway.config import LogSettings

_CONTEXT = ("event_id", "provider", "media_id", "job_id", "target")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT if hasattr(record, k))
        return f"{line} [{ctx}]" if ctx else line


def setup_logging(settings: LogSettings) -> None:
    """Configure the root logger from ``[log]`` (level; format ``auto``/``json``/``text``)."""
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    logging.getLogger("aiohttp.access").setLevel(max(logging.INFO, logging.getLevelName(settings.level)))
