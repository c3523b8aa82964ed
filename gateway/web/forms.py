"""Reading request bodies, one home each: a JSON body into a pydantic model, and a multipart form
whose fields come first and whose ``file`` part comes last and is streamed (as in S3's POST
upload). Every malformed body is an :class:`ApiError` 4xx, never an error of ours."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from pydantic import BaseModel, ValidationError

from gateway.config import format_validation_error
from gateway.keys import SETTINGS
from gateway.web.errors import ApiError

M = TypeVar("M", bound=BaseModel)

FILE_LAST = ("send every form field before the 'file' part (the file is streamed to storage as it "
             "arrives, so it comes last)")


def refuse_oversize(request: web.Request) -> None:
    """Refuse at once a body that declares more than ``media.max_bytes`` plus 1 MiB for the form
    fields: :class:`ApiError` 413. (A body that crosses it while streaming is refused by the store.)"""
    limit = request.app[SETTINGS].media.max_bytes + 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"body over the limit of {limit} bytes")


def invalid(err: ValidationError, hint: str = "") -> ApiError:
    """HTTP 422 naming the fields a model refused (``hint`` appended after ``; ``)."""
    return ApiError(422, format_validation_error(err) + (f"; {hint}" if hint else ""))


async def json_body(request: web.Request, model: type[M], not_json: str = "body is not JSON") -> M:
    """The request's JSON object validated by ``model``. Raises :class:`ApiError` 400 (not JSON,
    or an unknown charset: ``not_json``) or 422 (not an object, or a field ``model`` refuses)."""
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError, LookupError):  # LookupError: unknown charset
        raise ApiError(400, not_json) from None
    if not isinstance(data, dict):
        raise ApiError(422, "body must be a JSON object")
    try:
        return model(**data)
    except ValidationError as err:
        raise invalid(err) from None
    except TypeError:
        raise ApiError(422, "body must be a JSON object with string keys") from None


def _malformed(exc: ValueError) -> ApiError:
    return ApiError(400, f"malformed multipart body: {exc}")


async def next_part(reader: MultipartReader) -> BodyPartReader | None:
    """The next part of a multipart body; a malformed body is HTTP 400, a nested one 422."""
    try:
        part = await reader.next()
    except ValueError as exc:
        raise _malformed(exc) from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise ApiError(422, "nested multipart is not supported")
    return part


async def read_field(part: BodyPartReader, limit: int) -> str:
    """A form field's text, cut at ``limit`` bytes; a body that ends inside it is HTTP 400."""
    try:
        return (await part.read(decode=False))[:limit].decode("utf-8", "replace")
    except ValueError as exc:
        raise _malformed(exc) from None


class PartAfterFile(ApiError):
    """A multipart body has a part after ``file`` (HTTP 422; nothing is stored)."""


class Form:
    """A ``multipart/form-data`` body read up to its ``file`` part: ``fields`` (name -> text, each
    cut at the limit given to :meth:`read`) and ``file`` (None if the body has none)."""

    def __init__(self, reader: MultipartReader, fields: dict[str, str], file: BodyPartReader | None) -> None:
        self.reader, self.fields, self.file = reader, fields, file

    @classmethod
    async def read(cls, request: web.Request, allowed: Collection[str], field_limit: int) -> Form:
        """Read the fields before ``file``. Raises :class:`ApiError` 400 for a malformed body (no
        boundary, ends inside a part) and 422 for a field not in ``allowed``."""
        try:
            reader = await request.multipart()
        except ValueError as exc:  # a Content-Type without a boundary
            raise _malformed(exc) from None
        fields: dict[str, str] = {}
        while (part := await next_part(reader)) is not None:
            if part.name == "file":
                return cls(reader, fields, part)
            if part.name is None or part.name not in allowed:
                raise ApiError(422, f"unknown form field {part.name!r}")
            fields[part.name] = await read_field(part, field_limit)
        return cls(reader, fields, None)

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The ``file`` part's bytes, streamed (1 MiB reads). The file must be the last part: once
        its bytes end, a further part raises :class:`PartAfterFile` before the stream does, so the
        storage backend discards what it wrote and nothing is stored."""
        assert self.file is not None
        while chunk := await self.file.read_chunk(1024 * 1024):
            yield chunk
        late = await next_part(self.reader)
        if late is not None:
            raise PartAfterFile(422, f"form field {late.name or '(unnamed)'!r} comes after the 'file' part: "
                                     f"{FILE_LAST}; nothing was stored")
