"""gateway.links.LinkSigner: signed, expiring media links. The clock is injected (``now``)."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from gateway.links import LinkError, LinkSigner

NOW = 1_700_000_000.0
SECRET = b"test-link-secret"


def _signer(secret: bytes = SECRET) -> LinkSigner:
    return LinkSigner(secret, "https://gw.example.com/", ttl=3600)


def _parts(url: str) -> tuple[str, str, str, str]:
    """(media id, filename, exp, sig) as the /media/{id}/{filename} route would see them."""
    u = urlsplit(url)
    assert u.scheme == "https" and u.netloc == "gw.example.com"
    segments = u.path.split("/")
    assert segments[:2] == ["", "media"] and len(segments) == 4
    q = parse_qs(u.query, strict_parsing=True)
    return unquote(segments[2]), unquote(segments[3]), q["exp"][0], q["sig"][0]


@pytest.mark.parametrize("filename", ["photo.jpg", "Résumé €.pdf", "a b?c#d&e=f.txt", "ü/ä.bin"])
def test_round_trip(filename):
    s = _signer()
    url = s.link("m_0123abc", filename, now=NOW)
    assert url.startswith("https://gw.example.com/media/")  # trailing slash of base_url dropped
    media_id, name, exp, sig = _parts(url)
    assert (media_id, name) == ("m_0123abc", filename)
    assert int(exp) == int(NOW) + 3600
    assert "=" not in sig  # unpadded base64url
    s.verify(media_id, name, exp, sig, now=NOW)
    s.verify(media_id, name, exp, sig, now=NOW + 3599)


def test_explicit_ttl():
    s = _signer()
    _, _, exp, sig = _parts(s.link("m_1", "f.jpg", ttl=60, now=NOW))
    assert int(exp) == int(NOW) + 60
    s.verify("m_1", "f.jpg", exp, sig, now=NOW + 59)
    with pytest.raises(LinkError):
        s.verify("m_1", "f.jpg", exp, sig, now=NOW + 61)


def test_verify_accepts_a_link_from_another_signer_with_the_same_secret():
    _, _, exp, sig = _parts(_signer().link("m_1", "f.jpg", now=NOW))
    LinkSigner(SECRET, "http://other", ttl=5).verify("m_1", "f.jpg", exp, sig, now=NOW)


@pytest.fixture
def signed() -> tuple[LinkSigner, str, str, str, str]:
    s = _signer()
    return (s, *_parts(s.link("m_0123abc", "photo.jpg", now=NOW)))


def test_wrong_signature(signed):
    s, media_id, name, exp, sig = signed
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(LinkError):
        s.verify(media_id, name, exp, flipped, now=NOW)
    with pytest.raises(LinkError):
        s.verify(media_id, name, exp, sig[:-1], now=NOW)


def test_wrong_secret(signed):
    _, media_id, name, exp, sig = signed
    with pytest.raises(LinkError):
        _signer(b"another-secret").verify(media_id, name, exp, sig, now=NOW)


def test_changed_filename(signed):
    s, media_id, _, exp, sig = signed
    for other in ("photo.jpeg", "photo.exe", "Photo.jpg", "photo.jpg ", ""):
        with pytest.raises(LinkError):
            s.verify(media_id, other, exp, sig, now=NOW)


def test_changed_id(signed):
    s, _, name, exp, sig = signed
    for other in ("m_0123abd", "m_0123ab", "m_0123abc/photo.jpg", ""):
        with pytest.raises(LinkError):
            s.verify(other, name, exp, sig, now=NOW)


def test_changed_expiry(signed):
    s, media_id, name, exp, sig = signed
    for other in (str(int(exp) + 1), str(int(exp) + 10**6), str(int(exp) - 1)):
        with pytest.raises(LinkError):
            s.verify(media_id, name, other, sig, now=NOW)


def test_expiry_that_is_not_a_number(signed):
    s, media_id, name, _, sig = signed
    for other in ("soon", "1.5e9", "0x10"):
        with pytest.raises(LinkError):
            s.verify(media_id, name, other, sig, now=NOW)


def test_expired(signed):
    s, media_id, name, exp, sig = signed
    s.verify(media_id, name, exp, sig, now=int(exp))  # valid up to and including exp
    with pytest.raises(LinkError, match="expired"):
        s.verify(media_id, name, exp, sig, now=int(exp) + 1)
    with pytest.raises(LinkError):
        s.verify(media_id, name, exp, sig, now=NOW + 10 * 3600)


@pytest.mark.parametrize("exp_missing,sig_missing", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("empty", [None, ""])
def test_missing_signature_or_expiry(signed, exp_missing, sig_missing, empty):
    s, media_id, name, exp, sig = signed
    with pytest.raises(LinkError):
        s.verify(media_id, name, empty if exp_missing else exp, empty if sig_missing else sig, now=NOW)
