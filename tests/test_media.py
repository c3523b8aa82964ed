"""gateway.media: type decisions, sniffing of the real fixture files, categories, hostile
filenames, Content-Disposition, object keys and the MediaStream wrapper."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from gateway.media import (
    HASH_BATCH_BYTES,
    HASH_INLINE_BYTES,
    HASH_MAX_PENDING_BYTES,
    SNIFF_BYTES,
    DigestMismatch,
    MediaStream,
    MediaTooLarge,
    category_for,
    content_disposition,
    decide_type,
    object_key,
    safe_filename,
    sniff,
)
from gateway.sdk.storage import InvalidKey
from plugins.storage_local import LocalStorage
from tests.conftest import MANIFEST, MEDIA

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
ELF = "not_really_an_image.jpg"


# -- decide_type ----------------------------------------------------------------------------------

def test_executable_declared_as_jpeg_is_a_mismatch_and_not_an_image():
    head = (MEDIA / ELF).read_bytes()[:SNIFF_BYTES]
    sniffed = sniff(head)
    d = decide_type(sniffed, "image/jpeg", "photo.jpg")
    assert d.mismatch is True
    assert not d.mimetype.startswith("image/")
    assert d.mimetype == sniffed  # the content wins
    assert d.category == "other"
    assert d.declared == "image/jpeg"
    assert d.sniffed == sniffed


def test_elf_mime_literal_declared_jpeg_is_mismatch():
    d = decide_type("application/x-executable", "image/jpeg")
    assert d.mismatch is True
    assert d.mimetype == "application/x-executable"
    assert d.category == "other"


def test_zip_sniffed_docx_declared_is_docx():
    d = decide_type("application/zip", DOCX, "report.docx")
    assert d.mimetype == DOCX
    assert d.category == "document"
    assert d.mismatch is False


def test_text_plain_sniffed_csv_declared_is_csv():
    d = decide_type("text/plain", "text/csv", "customers.csv")
    assert d.mimetype == "text/csv"
    assert d.category == "document"
    assert d.mismatch is False


def test_ogg_with_codec_parameter_is_no_mismatch():
    d = decide_type("audio/ogg", "audio/ogg; codecs=opus")
    assert d.mismatch is False
    assert d.mimetype == "audio/ogg"
    assert d.declared == "audio/ogg"
    assert d.category == "audio"


def test_image_jpg_alias_is_no_mismatch():
    d = decide_type("image/jpeg", "image/jpg")
    assert d.mismatch is False
    assert d.mimetype == "image/jpeg"
    assert d.category == "image"


@pytest.mark.parametrize("declared", ["application/octet-stream", "binary/octet-stream", None, ""])
def test_octet_stream_or_missing_declared_type_lets_the_sniffed_type_win(declared):
    d = decide_type("image/png", declared)
    assert d.mimetype == "image/png"
    assert d.category == "image"
    assert d.mismatch is False


def test_a_real_contradiction_keeps_the_sniffed_type():
    d = decide_type("image/png", "image/jpeg")
    assert d.mismatch is True
    assert d.mimetype == "image/png"


# -- sniff on the real fixture files --------------------------------------------------------------

def _declared(name: str) -> str:
    if name == ELF:
        return "image/jpeg"
    if name == "voice.ogg":
        return "audio/ogg; codecs=opus"
    return MANIFEST[name]["mime"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_sniff_and_decide_on_fixture_files(name):
    info = MANIFEST[name]
    data = (MEDIA / name).read_bytes()
    assert len(data) == info["size"]
    sniffed = sniff(data[:SNIFF_BYTES])
    assert sniffed == sniffed.lower() and ";" not in sniffed
    d = decide_type(sniffed, _declared(name), name)
    if name == ELF:
        assert not sniffed.startswith("image/")
        assert d.mismatch is True
        assert d.category == "other"
        assert not d.mimetype.startswith("image/")
    else:
        assert d.mimetype == info["mime"]
        assert d.category == info["category"]
        assert d.mismatch is False


def test_sniff_of_nothing_is_empty():
    assert sniff(b"") == "application/x-empty"


# -- category_for ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mime,category", [
    ("image/png", "image"),
    ("IMAGE/PNG", "image"),
    ("image/svg+xml", "image"),
    ("video/mp4", "video"),
    ("audio/ogg; codecs=opus", "audio"),
    ("application/pdf", "document"),
    ("text/csv", "document"),
    ("text/plain", "document"),
    (DOCX, "document"),
    ("application/vnd.oasis.opendocument.text", "document"),
    ("application/json", "document"),
    ("application/zip", "other"),
    ("application/x-executable", "other"),
    ("application/octet-stream", "other"),
    (None, "other"),
    ("", "other"),
])
def test_category_for(mime, category):
    assert category_for(mime) == category


# -- safe_filename --------------------------------------------------------------------------------

def _assert_safe(name: str) -> None:
    assert name
    assert "/" not in name and "\\" not in name
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in name)
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert len(name) <= 150


def test_safe_filename_strips_the_path_of_a_traversal():
    out = safe_filename("../../etc/passwd", "fallback.bin")
    assert out == "passwd"
    _assert_safe(out)


@pytest.mark.parametrize("raw,expected", [
    ("dir/sub/report.pdf", "report.pdf"),
    ("C:\\Users\\x\\report.pdf", "report.pdf"),
    ("/etc/", "fb"),
    ("..", "fb"),
    ("../..", "fb"),
])
def test_safe_filename_with_slashes(raw, expected):
    out = safe_filename(raw, "fb")
    assert out == expected
    _assert_safe(out)


def test_safe_filename_removes_nul_and_control_characters():
    out = safe_filename("evil\x00.jpg\x00.exe\r\n", "fb")
    assert "\x00" not in out and "\r" not in out and "\n" not in out
    assert out == "evil.jpg.exe"


def test_safe_filename_truncates_to_150_keeping_the_extension():
    out = safe_filename("a" * 296 + ".pdf", "fb")
    assert len(out) <= 150
    assert out.endswith(".pdf")
    assert out.startswith("aaaa")
    _assert_safe(out)


def test_safe_filename_truncates_non_ascii_and_extensionless_names():
    out = safe_filename("é" * 300 + ".docx", "fb")
    assert len(out) <= 150 and out.endswith(".docx")
    out = safe_filename("b" * 300, "fb")
    assert len(out) <= 150 and out == "b" * len(out)


def test_safe_filename_removes_bidi_overrides_and_zero_width_characters():
    # "invoice<RLO>fdp.exe" displays as "invoiceexe.pdf"
    out = safe_filename("invoice\u202efdp.exe", "fb")
    assert out == "invoicefdp.exe"
    out = safe_filename("re\u200bpo\u200crt\u200d\ufeff\u2066.pdf\u2069", "fb")
    assert out == "report.pdf"
    for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\u200c\u200d\u200e\u200f\ufeff":
        assert ch not in out


@pytest.mark.parametrize("raw", [None, "", "   ", "...", "\u202e", "\u200b\u200b", "\x00\x00", "/"])
def test_safe_filename_empty_result_uses_the_fallback(raw):
    assert safe_filename(raw, "m_123.bin") == "m_123.bin"


def test_safe_filename_keeps_an_ordinary_unicode_name():
    assert safe_filename("Résumé 2024 (final).pdf", "fb") == "Résumé 2024 (final).pdf"


# -- content_disposition --------------------------------------------------------------------------

_CD = re.compile(r"""^(inline|attachment); filename="([^"\\]*)"; filename\*=UTF-8''([A-Za-z0-9%._~!#$&+^`|-]*)$""")


def _parse_cd(value: str) -> tuple[str, str, str]:
    m = _CD.match(value)
    assert m, value
    return m.group(1), m.group(2), unquote(m.group(3), encoding="utf-8", errors="strict")


def test_content_disposition_ascii_fallback_and_utf8_filename():
    kind, fallback, full = _parse_cd(content_disposition("Résumé €.pdf", "application/pdf"))
    assert kind == "inline"
    assert fallback.isascii() and fallback.endswith(".pdf") and fallback.startswith("Resume")
    assert full == "Résumé €.pdf"


@pytest.mark.parametrize("mime,kind", [
    ("image/jpeg", "inline"),
    ("image/png", "inline"),
    ("video/mp4", "inline"),
    ("audio/ogg; codecs=opus", "inline"),
    ("application/pdf", "inline"),
    ("image/svg+xml", "attachment"),
    ("IMAGE/SVG+XML", "attachment"),
    ("text/html", "attachment"),
    ("application/zip", "attachment"),
    ("application/x-executable", "attachment"),
    (DOCX, "attachment"),
    ("", "attachment"),
])
def test_content_disposition_inline_vs_attachment(mime, kind):
    assert _parse_cd(content_disposition("file.bin", mime))[0] == kind


@pytest.mark.parametrize("name", ['a"b.pdf', "x\r\nSet-Cookie: y=1.pdf", "a\\b;c.pdf", "下载.pdf", "中文"])
def test_content_disposition_cannot_be_broken_by_the_filename(name):
    value = content_disposition(name, "application/pdf")
    assert "\r" not in value and "\n" not in value
    kind, fallback, full = _parse_cd(value)
    assert fallback  # never empty
    assert full == name


def test_content_disposition_all_non_ascii_gets_a_usable_fallback():
    _, fallback, full = _parse_cd(content_disposition("中文", "application/zip"))
    assert fallback == "download"
    assert full == "中文"


# -- object_key -----------------------------------------------------------------------------------

TEMPLATE = "{provider}/{account}/{yyyy}/{mm}/{dd}/{category}/{id}{ext}"


def test_object_key_renders_the_template():
    key = object_key(TEMPLATE, provider="waha", account="default", category="image",
                     media_id="m_1", ext=".jpg", now=0)
    assert key == "waha/default/1970/01/01/image/m_1.jpg"


def test_object_key_account_cannot_escape():
    key = object_key(TEMPLATE, provider="waha", account="../x", category="image", media_id="m_1",
                     ext=".jpg", now=0)
    assert ".." not in key
    assert key.count("/") == TEMPLATE.count("/")
    assert key.startswith("waha/")
    assert key.endswith("/image/m_1.jpg")


@pytest.mark.parametrize("account", [
    "../x", "..", ".", "../../../../etc", "/abs", "a/b/c", "a\\b", "a\x00b", ".hidden", "",
    "x" * 500, "тест", "${HOME}", "{id}", "%2e%2e%2f",
])
@pytest.mark.parametrize("provider", ["waha", "../p", "p/q"])
def test_object_key_user_values_stay_in_their_segment(account, provider):
    key = object_key(TEMPLATE, provider=provider, account=account, category="document",
                     media_id="m_abc", ext=".pdf", now=1_700_000_000)
    parts = key.split("/")
    assert len(parts) == TEMPLATE.count("/") + 1
    assert all(p and p not in (".", "..") and not p.startswith(".") for p in parts)
    assert "\x00" not in key and "\\" not in key
    assert parts[-2:] == ["document", "m_abc.pdf"]
    # and the key is one the local storage backend accepts (stays under its root)
    LocalStorage(Path("/nonexistent-root")).path_for(key)


def test_local_storage_refuses_what_object_key_never_produces():
    # sanity check of the previous test's oracle
    with pytest.raises(InvalidKey):
        LocalStorage(Path("/nonexistent-root")).path_for("waha/../x/m.jpg")


# -- MediaStream ----------------------------------------------------------------------------------

async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _drain(ms: MediaStream, out: list[bytes]) -> None:
    async for chunk in ms:
        out.append(chunk)


@pytest.mark.parametrize("chunk_size", [1000, 100_000])  # 100_000 hashes in a thread
async def test_media_stream_hash_and_size_of_a_fixture(chunk_size):
    info = MANIFEST["clip.mp4"]
    data = (MEDIA / "clip.mp4").read_bytes()
    ms = MediaStream(_chunks(data, chunk_size), max_bytes=info["size"], expected_sha256=info["sha256_hex"])
    out: list[bytes] = []
    await _drain(ms, out)
    assert b"".join(out) == data
    assert ms.size == info["size"]
    assert ms.sha256 == info["sha256_hex"]


async def test_media_stream_of_nothing():
    ms = MediaStream(_chunks(b"", 10), max_bytes=10)
    assert await ms.read_head() == b""
    out: list[bytes] = []
    await _drain(ms, out)
    assert out == [] and ms.size == 0
    assert ms.sha256 == hashlib.sha256(b"").hexdigest()


async def test_media_stream_too_large_never_passes_bytes_beyond_the_limit():
    data = bytes(range(256)) * 4  # 1024 bytes, chunks of 100
    ms = MediaStream(_chunks(data, 100), max_bytes=250)
    out: list[bytes] = []
    with pytest.raises(MediaTooLarge) as info:
        await _drain(ms, out)
    assert info.value.limit == 250
    passed = b"".join(out)
    assert len(passed) <= 250
    assert passed == data[:200]  # the chunk that crosses the limit is not passed on
    assert ms.size <= 250


async def test_media_stream_exactly_at_the_limit_is_fine():
    data = b"x" * 300
    ms = MediaStream(_chunks(data, 100), max_bytes=300)
    out: list[bytes] = []
    await _drain(ms, out)
    assert b"".join(out) == data and ms.size == 300


async def test_media_stream_too_large_during_read_head():
    ms = MediaStream(_chunks(b"y" * 5000, 1000), max_bytes=2500)
    with pytest.raises(MediaTooLarge):
        await ms.read_head(4096)


async def test_media_stream_digest_mismatch_at_the_end():
    data = b"hello world" * 1000
    ms = MediaStream(_chunks(data, 1024), max_bytes=len(data), expected_sha256="00" * 32)
    out: list[bytes] = []
    with pytest.raises(DigestMismatch):
        await _drain(ms, out)
    # raised only at the end: every byte was passed on first
    assert b"".join(out) == data
    assert ms.sha256 == hashlib.sha256(data).hexdigest()


async def test_media_stream_accepts_an_upper_case_expected_digest():
    data = b"abc" * 100
    ms = MediaStream(_chunks(data, 7), max_bytes=1000,
                     expected_sha256=hashlib.sha256(data).hexdigest().upper())
    out: list[bytes] = []
    await _drain(ms, out)
    assert b"".join(out) == data


@pytest.mark.parametrize("chunk_size,head", [(1000, 10), (3000, 8192), (7, 8192), (50_000, 8192),
                                             (1000, 100_000)])
async def test_media_stream_read_head_then_iteration_yields_every_byte_once(chunk_size, head):
    data = (MEDIA / "photo.jpg").read_bytes()
    ms = MediaStream(_chunks(data, chunk_size), max_bytes=len(data))
    got_head = await ms.read_head(head)
    assert got_head == data[:head]
    assert await ms.read_head(head) == got_head  # reading the head again consumes nothing
    out: list[bytes] = []
    await _drain(ms, out)
    assert b"".join(out) == data
    assert ms.size == len(data)
    assert ms.sha256 == MANIFEST["photo.jpg"]["sha256_hex"]


# Past HASH_INLINE_BYTES the digest is computed in a worker thread, in batches, while the stream goes on.
BIG = os.urandom(HASH_INLINE_BYTES + 2 * HASH_MAX_PENDING_BYTES + 3 * HASH_BATCH_BYTES + 12345)


@pytest.mark.parametrize("chunk_size", [4096, 64 * 1024, 1024 * 1024 + 1, 3 * 1024 * 1024])
async def test_a_large_stream_hashed_in_a_thread_has_the_digest_of_its_bytes_in_order(chunk_size):
    ms = MediaStream(_chunks(BIG, chunk_size), max_bytes=len(BIG),
                     expected_sha256=hashlib.sha256(BIG).hexdigest())
    assert await ms.read_head() == BIG[:SNIFF_BYTES]
    out: list[bytes] = []
    await _drain(ms, out)
    assert b"".join(out) == BIG
    assert ms.size == len(BIG) and ms.sha256 == hashlib.sha256(BIG).hexdigest()


async def test_a_large_stream_with_another_digest_is_refused_at_its_end():
    ms = MediaStream(_chunks(BIG, 256 * 1024), max_bytes=len(BIG),
                     expected_sha256=hashlib.sha256(BIG[:-1]).hexdigest())
    out: list[bytes] = []
    with pytest.raises(DigestMismatch):
        await _drain(ms, out)
    assert b"".join(out) == BIG  # every byte passed on before the check
    assert ms.sha256 == hashlib.sha256(BIG).hexdigest()


async def test_a_large_stream_too_large_stops_with_a_batch_being_hashed():
    limit = len(BIG) - HASH_BATCH_BYTES
    ms = MediaStream(_chunks(BIG, 256 * 1024), max_bytes=limit)
    out: list[bytes] = []
    with pytest.raises(MediaTooLarge):
        await _drain(ms, out)
    assert b"".join(out) == BIG[:len(b"".join(out))] and ms.size <= limit
    assert ms.sha256 is None  # no digest of a partial stream


async def test_a_stream_resumed_by_its_source_keeps_one_digest_over_both_parts():
    """What ``resumable_body`` does after a broken body: the bytes of the ``206`` answer follow the
    bytes already yielded, and the one MediaStream hash goes on over them."""
    cut = HASH_INLINE_BYTES + HASH_BATCH_BYTES + 777  # in the thread's part of the stream

    async def resumed() -> AsyncIterator[bytes]:
        async for chunk in _chunks(BIG[:cut], 64 * 1024):  # the first answer, broken at ``cut``
            yield chunk
        async for chunk in _chunks(BIG[cut:], 100_000):  # Range: bytes=cut-
            yield chunk

    ms = MediaStream(resumed(), max_bytes=len(BIG), expected_sha256=hashlib.sha256(BIG).hexdigest())
    out: list[bytes] = []
    await _drain(ms, out)
    assert b"".join(out) == BIG and ms.sha256 == hashlib.sha256(BIG).hexdigest()
