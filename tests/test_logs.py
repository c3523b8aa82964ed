"""Log lines never hold a capability: signatures and tokens are redacted, paths kept."""

from __future__ import annotations

import logging

import pytest

from gateway.logs import RedactFilter, redact


@pytest.mark.parametrize("line,expected", [
    ("GET /media/m_1/photo.jpg?exp=1764300000&sig=Zm9vYmFy-_x HTTP/1.1",
     "GET /media/m_1/photo.jpg?exp=1764300000&sig=[redacted] HTTP/1.1"),
    ("302 https://s3.example/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026&"
     "X-Amz-Signature=deadbeef&X-Amz-Security-Token=FwoG",
     "302 https://s3.example/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=[redacted]&"
     "X-Amz-Signature=[redacted]&X-Amz-Security-Token=[redacted]"),
    ("GET /webhooks/meta?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=42",
     "GET /webhooks/meta?hub.mode=subscribe&hub.verify_token=[redacted]&hub.challenge=42"),
    ('refused: "Authorization: Bearer bot-key.1"', 'refused: "Authorization: Bearer [redacted]"'),
    ("GET /api/v1/files?category=image&limit=5", "GET /api/v1/files?category=image&limit=5"),
])
def test_redact(line, expected):
    assert redact(line) == expected


def test_the_filter_redacts_the_message_and_the_extras():
    record = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1, '%s "%s"',
                               ("127.0.0.1", "GET /media/m_1/a.jpg?exp=1&sig=secret"), None)
    record.first_request_line = "GET /media/m_1/a.jpg?exp=1&sig=secret HTTP/1.1"
    record.request_header = {"Authorization": "Bearer bot-key", "Referer": "-"}
    assert RedactFilter().filter(record)
    assert record.getMessage() == '127.0.0.1 "GET /media/m_1/a.jpg?exp=1&sig=[redacted]"'
    assert record.first_request_line == "GET /media/m_1/a.jpg?exp=1&sig=[redacted] HTTP/1.1"
    assert record.request_header == {"Authorization": "Bearer [redacted]", "Referer": "-"}
