"""The HTTP API's request and response bodies as pydantic models: the handlers validate with them
and ``/openapi.json`` takes its schemas from them (``model_json_schema()``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gateway.catalog import JOB_STATES, exact_time
from gateway.media import CATEGORIES
from gateway.sdk.provider import OUTBOUND_TYPES

MediaType = Literal["image", "video", "audio", "voice", "document", "sticker"]
assert set(MediaType.__args__) == set(OUTBOUND_TYPES)  # type: ignore[attr-defined]
FORM_FIELDS = {"provider", "account", "to", "type", "caption", "filename", "convert", "by"}
MAX_LIMIT = 1000
CATEGORY_NAMES = tuple(CATEGORIES)
Category = Literal["image", "video", "audio", "document", "other"]
assert set(Category.__args__) == set(CATEGORIES)  # type: ignore[attr-defined]
JobState = Literal["queued", "running", "done", "dead"]
assert set(JobState.__args__) == set(JOB_STATES)  # type: ignore[attr-defined]
Direction = Literal["inbound", "outbound", "upload"]

# what Timestamp.check takes (years 1 to 9999), as the OpenAPI document shows it
TimeInput = Annotated[float, WithJsonSchema({"anyOf": [
    {"type": "number", "description": "epoch seconds", "minimum": -62135596800, "maximum": 253402300799},
    {"type": "string", "format": "date-time", "description": "RFC 3339 (naive: UTC)"}]})]


class MediaSpec(BaseModel):
    """``media``: exactly one of a stored media ``id`` or a ``url`` to fetch."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["id"], "properties": {"id": {"type": "string"}}},
        {"required": ["url"], "properties": {"url": {"type": "string"}}}]})

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


class MessageRequest(MessageBody):
    """The JSON body of ``POST /api/v1/messages``: a message with its ``media`` (a form sends the
    file instead)."""

    media: MediaSpec


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


# an optional time field: what Timestamp.check takes, held as epoch seconds
TimeArg = Annotated[TimeInput | None, BeforeValidator(Timestamp.check)]


class StoreOptions(BaseModel):
    """What an upload may say of the file it stores: its ``metadata`` (the caller's JSON object),
    ``is_public`` and ``expires_at``."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] | None = None
    is_public: bool = False
    expires_at: TimeArg = None


class UploadFields(StoreOptions):
    """The form fields of ``POST /files`` (besides ``file``). ``category`` is what the client
    declares: the content decides the category; one that contradicts it is a type mismatch
    (``media.type_mismatch``: stored under the content's category and recorded, or refused)."""

    category: Category | None = Field(
        None, description="the category the client expects; the content decides, and a contradicting one "
                          "is a type mismatch (`media.type_mismatch`: recorded, or refused with 422)")

    @field_validator("metadata", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object") from None
        return value


class FromUrlBody(StoreOptions):
    """The body of ``POST /files/from-url``."""

    url: str = Field(min_length=1, max_length=4096,
                     description="an http(s) URL, fetched under the `[fetch]` rules; a link of this gateway "
                                 "is not fetched: its stored object is copied")
    filename: str | None = Field(None, max_length=1024)


class ListQuery(BaseModel):
    """The query of ``GET /files``."""

    model_config = ConfigDict(extra="forbid")

    category: Category | None = None
    provider: str | None = Field(None, max_length=100)
    account: str | None = Field(None, max_length=200)
    chat: str | None = Field(None, max_length=200)
    tenant: str | None = Field(None, max_length=200)
    direction: Direction | None = Field(
        None, description="inbound (from a webhook), outbound (sent by a bot) or upload (the files API)")
    message_id: str | None = Field(None, max_length=200, description="the provider's message id")
    mime: str | None = Field(None, max_length=200, description="MIME type prefix, e.g. image/")
    filename: str | None = Field(None, max_length=255, description="substring, case-insensitive")
    created_after: TimeArg = None
    created_before: TimeArg = None
    is_public: bool | None = None
    sort: Literal["created_at", "size"] = "created_at"
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=1000)



class PatchBody(BaseModel):
    """The body of ``PATCH /files/{id}``: at least one field. An absent field is left as it is;
    ``null`` resets a field to what an upload without it gets: ``metadata`` to ``{}``,
    ``is_public`` to false, ``expires_at`` to none (the retention rules apply). ``filename``
    cannot be null (every file has a name)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    metadata: dict[str, Any] | None = None
    filename: str | None = Field(None, min_length=1, max_length=1024)
    is_public: bool | None = None
    expires_at: TimeArg = None

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


class ProviderPayload(RootModel[dict[str, Any]]):
    """the provider's payload"""


# -- query strings (described in the OpenAPI document; the handlers parse them) ---------------

class JobsQuery(BaseModel):
    """The query of ``GET /api/v1/jobs``."""

    state: JobState | None = None
    kind: str | None = None
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=19, pattern=r"^[0-9]+$",
                               description="`next_cursor` of the previous page")


class LinkQuery(BaseModel):
    """The query of ``GET /api/v1/files/{id}/link``."""

    expires: int | None = Field(None, ge=1, le=7 * 24 * 3600,
                                description="seconds the link is valid (default `media.link_ttl`)")
    direct: bool | None = Field(None, description="a presigned storage URL instead of a gateway link")


class CleanupQuery(BaseModel):
    """The query of ``POST /api/v1/admin/cleanup``."""

    dry_run: bool | None = Field(None, description="report what would be deleted, delete nothing")


class MediaQuery(BaseModel):
    """The query of a signed ``/media`` link (:mod:`gateway.links`)."""

    exp: int = Field(description="expiry, epoch seconds")
    sig: str


class ThumbnailQuery(BaseModel):
    """The query of a signed thumbnail link (:meth:`gateway.links.LinkSigner.thumbnail_link`)."""

    size: Literal[128, 256, 512] = Field(256, description="the longer side, in pixels")
    exp: int = Field(description="expiry, epoch seconds")
    sig: str


# -- responses: what the views produce ---------------------------------------------------------

Count = Annotated[int, Field(ge=0)]
Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time", "description": "RFC 3339, UTC"})]
Uri = Annotated[str, WithJsonSchema({"type": "string", "format": "uri"})]
Object = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "additionalProperties": True})]


class Out(BaseModel):
    """A response object: every field present, no other."""

    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    """Every error the gateway itself answers; some carry more fields (an unknown provider lists
    the `providers`)."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="what went wrong")


class FileLinks(Out):
    content: Uri = Field(description="a signed `/media` link, valid for `media.link_ttl` seconds")
    public: Uri | None = Field(description="the stable `/public` link while the file is public")
    thumbnail: Uri | None = Field(description="a signed 256 px thumbnail link (`getThumbnail`), for images "
                                              "and stickers; valid for `media.link_ttl` seconds")


class FileInfo(Out):
    """A stored file (`file_view()`)."""

    id: str = Field(description="media id, `m_` and 27 characters")
    filename: str
    mimetype: str = Field(description="sniffed from the bytes")
    declared_mimetype: str | None = Field(description="what the sender said")
    category: Category
    size: Count = Field(description="bytes")
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    provider: str | None
    account: str | None
    chat: str | None
    message_id: str | None
    direction: Direction | None
    backend: str | None
    state: Literal["stored", "missing", "deleting"]
    tenant: str | None
    is_public: bool
    created_at: Time
    expires_at: Time | None
    metadata: Object = Field(description="the caller's own JSON object")
    links: FileLinks


class FileList(Out):
    items: list[FileInfo] = Field(max_length=MAX_LIMIT)
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class Totals(Out):
    count: Count
    bytes: Count


class Stats(Out):
    total: Totals
    by_category: dict[str, Totals]
    by_provider: dict[str, Totals]
    by_backend: dict[str, Totals]


class CategoryTotals(Out):
    name: Category
    count: Count
    bytes: Count


class Categories(Out):
    categories: list[CategoryTotals]


class Link(Out):
    url: Uri
    expires_at: Time
    direct: bool = Field(description="a presigned storage URL rather than a gateway link")


class Job(Out):
    """A job of the durable queue (`job_view()`)."""

    id: Count
    kind: str = Field(description="`ingest` or `deliver`")
    key: str
    state: JobState
    attempts: Count
    run_at: Time
    created_at: Time
    updated_at: Time
    last_error: str | None
    payload: Object


class JobList(Out):
    items: list[Job] = Field(max_length=MAX_LIMIT)
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null on the last")


class SentMedia(Out):
    id: str
    link: Uri


class SendResult(Out):
    provider_message_id: str = Field(description="the provider's id of the sent message")
    media: SentMedia


class DeletedCount(Out):
    objects: Count
    bytes: Count


class Pruned(Out):
    events: Count
    jobs: Count


class CleanupReport(Out):
    """What a cleanup run did, or in a dry run would have done (`CleanupReport.to_dict()`)."""

    dry_run: bool
    trigger: str = Field(description="`api`, `schedule` or `cli`")
    backend: str
    now: float = Field(description="the policy clock, epoch seconds")
    started_at: float
    finished_at: float | None
    deleted: dict[str, DeletedCount] = Field(description="by reason: `age`, `expires_at`, `orphan`")
    rows_without_object: Count
    failed: Count
    errors: list[str]
    kept_in_use: Count
    missing: Count
    missing_ids: list[str]
    listed: Count | None
    orphans_in_grace: Count
    foreign_objects: Count
    aborted_uploads: Count | None = Field(
        description="incomplete (multipart) uploads aborted; null when the backend has none")
    uploads_in_grace: Count | None
    pruned: Pruned
    error: str | None = Field(description="why the run stopped early (then the status is 503)")
    objects: Count
    bytes: Count


class WebhookAccepted(Out):
    accepted: Count
    duplicates: Count
    event_ids: list[str] = Field(description="the new events' ids")


class Health(Out):
    status: Literal["ok"]


class Ready(BaseModel):
    """`ready`, and one entry per check (`catalog`, `storage`, `backlog`; `serving` with serving workers): `ok`,
    or why the check failed."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str]
    ready: bool


class FileEvent(Out):
    """One message of the `/api/v1/events` WebSocket."""

    type: Literal["created", "updated", "deleted"]
    file: FileInfo
