"""Logging setup: one JSON object a line when stderr is not a terminal (DESIGN §9), readable text
on a terminal. Records carry ``event_id``, ``provider`` and ``media_id`` when the caller passes
them in ``extra``. Signatures and tokens are redacted from every line (:func:`redact`).
"""

from __future__ import annotations

import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

from gateway.config import LogSettings

_CONTEXT = ("event_id", "provider", "media_id", "job_id", "target")


# Capability secrets a URL or header may carry: the media links' signature, S3 presigned URLs'
# signature and session token, Meta's verification token, bearer tokens.
_SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:sig|x-amz-signature|x-amz-security-token|x-amz-credential|hub\.verify_token|"
    r"access_token|token|signature)=)[^&\s\"';]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with signatures and tokens replaced by ``[redacted]``: the query parameters
    ``sig``, ``X-Amz-Signature``, ``X-Amz-Security-Token``, ``X-Amz-Credential``,
    ``hub.verify_token``, ``access_token``, ``token``, ``signature``, and bearer tokens. Paths and
    other parameters are kept."""
    return _BEARER.sub(r"\1" + REDACTED, _SECRET_PARAMS.sub(r"\1" + REDACTED, text))


class RedactFilter(logging.Filter):
    """Redacts every record that passes the handler (see :func:`redact`): a log line never holds
    a working capability URL, whatever logger wrote it (``aiohttp.access`` included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        for name, value in list(vars(record).items()):  # extras too (aiohttp's first_request_line, ...)
            if isinstance(value, str) and name != "msg":
                setattr(record, name, redact(value))
            elif isinstance(value, dict):
                setattr(record, name, {k: redact(v) if isinstance(v, str) else v for k, v in value.items()})
        return True


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
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    logging.getLogger("aiohttp.access").setLevel(max(logging.INFO, logging.getLevelName(settings.level)))
