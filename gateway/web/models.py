"""The HTTP API's request and response bodies as pydantic models: the handlers validate with them
and ``/openapi.json`` takes its schemas from them (``model_json_schema()``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.catalog import exact_time
from gateway.media import CATEGORIES
from gateway.providers import OUTBOUND_TYPES

MediaType = Literal["image", "video", "audio", "voice", "document", "sticker"]
assert set(MediaType.__args__) == set(OUTBOUND_TYPES)  # type: ignore[attr-defined]
FORM_FIELDS = {"provider", "account", "to", "type", "caption", "filename", "convert", "by"}
MAX_LIMIT = 1000
CATEGORY_NAMES = tuple(CATEGORIES)


class MediaSpec(BaseModel):
    """``media``: exactly one of a stored media ``id`` or a ``url`` to fetch."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=100, description="a stored media id")
    url: str | None = Field(None, min_length=1, max_length=4096,
                            description="an http(s) URL, fetched under the `[fetch]` rules; a link of this "
                                        "gateway (a signed media link, or a public file's link) is not "
                                        "fetched: its stored object is copied")

    @model_validator(mode="after")
    def _one(self) -> MediaSpec:
        if (self.id is None) == (self.url is None):
            raise ValueError("give exactly one of media.id and media.url")
        return self


class MessageBody(BaseModel):
    """The body of ``POST /api/v1/messages``."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=64)
    account: str = Field(min_length=1, max_length=200)
    to: str = Field(min_length=1, max_length=200)
    type: MediaType
    media: MediaSpec | None = None
    caption: str | None = Field(None, max_length=4096)
    filename: str | None = Field(None, max_length=1024)
    convert: bool = False
    by: Literal["id", "link"] | None = None

    @field_validator("to", "account", mode="before")
    @classmethod
    def _digits_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def iso(ts: float | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC (``2026-11-21T05:30:00.123456Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> float:
    """Epoch seconds from a number, a numeric string or an RFC 3339 / ISO 8601 time (naive: UTC).
    Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Timestamp(BaseModel):
    """Validator holder: accepts what :func:`parse_time` accepts."""

    @staticmethod
    def check(value: Any) -> float | None:
        if value is None:
            return None
        try:
            ts = exact_time(parse_time(value))  # stored and compared at whole microseconds
            iso(ts)  # within years 1..9999, so that every view of it can show it
            return ts
        except (ValueError, OverflowError, OSError):
            raise ValueError("expected an RFC 3339 time or epoch seconds (years 1 to 9999)") from None


class UploadFields(BaseModel):
    """The form fields of ``POST /files`` (besides ``file``). ``category`` is what the client
    declares: the content decides the category; one that contradicts it is a type mismatch
    (``media.type_mismatch``: stored under the content's category and recorded, or refused)."""

    model_config = ConfigDict(extra="forbid")

    category: Literal["image", "video", "audio", "document", "other"] | None = Field(
        None, description="the category the client expects; the content decides, and a contradicting one "
                          "is a type mismatch (`media.type_mismatch`: recorded, or refused with 422)")
    metadata: dict[str, Any] | None = None
    is_public: bool = False
    expires_at: float | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object") from None
        return value

    @field_validator("expires_at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)



class FromUrlBody(BaseModel):
    """The body of ``POST /files/from-url``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=4096,
                     description="an http(s) URL, fetched under the `[fetch]` rules; a link of this gateway "
                                 "is not fetched: its stored object is copied")
    filename: str | None = Field(None, max_length=1024)
    metadata: dict[str, Any] | None = None
    is_public: bool = False
    expires_at: float | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)



class ListQuery(BaseModel):
    """The query of ``GET /files``."""

    model_config = ConfigDict(extra="forbid")

    category: Literal["image", "video", "audio", "document", "other"] | None = None
    provider: str | None = Field(None, max_length=100)
    account: str | None = Field(None, max_length=200)
    chat: str | None = Field(None, max_length=200)
    tenant: str | None = Field(None, max_length=200)
    direction: Literal["inbound", "outbound", "upload"] | None = Field(
        None, description="inbound (from a webhook), outbound (sent by a bot) or upload (the files API)")
    message_id: str | None = Field(None, max_length=200, description="the provider's message id")
    mime: str | None = Field(None, max_length=200, description="MIME type prefix, e.g. image/")
    filename: str | None = Field(None, max_length=255, description="substring, case-insensitive")
    created_after: float | None = None
    created_before: float | None = None
    is_public: bool | None = None
    sort: Literal["created_at", "size"] = "created_at"
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=1000)

    @field_validator("created_after", "created_before", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)



class PatchBody(BaseModel):
    """The body of ``PATCH /files/{id}``: at least one field. An absent field is left as it is;
    ``null`` resets a field to what an upload without it gets: ``metadata`` to ``{}``,
    ``is_public`` to false, ``expires_at`` to none (the retention rules apply). ``filename``
    cannot be null (every file has a name)."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] | None = None
    filename: str | None = Field(None, min_length=1, max_length=1024)
    is_public: bool | None = None
    expires_at: float | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)

    @field_validator("filename", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null: every file has a name")
        return value

    @model_validator(mode="after")
    def _some(self) -> PatchBody:
        if not self.model_fields_set:
            raise ValueError("give at least one of metadata, filename, is_public, expires_at")
        return self
