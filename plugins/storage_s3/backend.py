"""The ``storage_s3`` :class:`gateway.sdk.StorageBackend` (see the package docstring).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from gateway.sdk import (
    IncompleteUpload,
    InvalidKey,
    ObjectNotFound,
    ObjectStat,
    OpenedObject,
    PutResult,
    StorageError,
    content_disposition,
)
from plugins.storage_s3.settings import S3Settings

log = logging.getLogger("gateway.storage.s3")





READ_CHUNK = 256 * 1024


_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


ABORT_RETRY_MAX = 60.0  # seconds between attempts to abort a multipart upload, at most


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage:
    """A :class:`gateway.sdk.storage.StorageBackend` on S3 (aioboto3)."""

    name = "s3"

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._ready_buckets: set[str] = set()
        # multipart uploads whose abort failed, retried until done: upload id -> (bucket, S3 key)
        self.unaborted: dict[str, tuple[str, str]] = {}
        self._abort_task: asyncio.Task[None] | None = None
        self._abort_wake = asyncio.Event()
        self._closing = False

    @property
    def buckets(self) -> list[str]:
        """The default bucket and the per-category ones, without repeats."""
        return list(dict.fromkeys([self.settings.bucket, *self.settings.category_buckets.values()]))

    def bucket_for(self, category: str | None) -> str:
        """The bucket of a category (the default bucket unless configured)."""
        return self.settings.category_buckets.get(category or "", self.settings.bucket)

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in key.split("/")):
            raise InvalidKey(f"invalid object key {key!r}")
        return self.settings.prefix + key

    def _unkey(self, s3_key: str) -> str:
        return s3_key[len(self.settings.prefix):]

    def _sse(self) -> dict[str, str]:
        if self.settings.sse == "none":
            return {}
        args: dict[str, str] = {"ServerSideEncryption": self.settings.sse}
        if self.settings.sse == "aws:kms":
            args["SSEKMSKeyId"] = self.settings.kms_key_id or ""
        return args

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the client; create missing buckets (failures are logged, retried before writes)."""
        s = self.settings
        session = aioboto3.Session(
            aws_access_key_id=s.access_key_id.get_secret_value() if s.access_key_id else None,
            aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
            aws_session_token=s.session_token.get_secret_value() if s.session_token else None,
            region_name=s.region,
        )
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": s.addressing_style},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"max_attempts": s.max_retries, "mode": "standard"},
            max_pool_connections=max(10, s.max_concurrency * 2),
            # Uploads carry CRC32s that S3 verifies. Downloads are not checked against a stored
            # checksum (a multipart object's is a checksum of checksums, and some servers omit
            # the "-N" that marks it): the gateway keeps and checks its own SHA-256.
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_required",
        )
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(session.client(
            "s3", endpoint_url=str(s.endpoint_url).rstrip("/") if s.endpoint_url else None, config=config))
        try:
            await self._ensure_buckets()
        except StorageError as exc:
            log.warning("S3 not reachable at start (%s); will retry before the first write", exc)

    async def close(self) -> None:
        """Try the failed aborts once more, then close the client. Uploads still not aborted are
        logged; the retention cleanup's sweep removes them (:meth:`incomplete_uploads`)."""
        self._closing = True
        if self._abort_task is not None:
            self._abort_task.cancel()
            await asyncio.gather(self._abort_task, return_exceptions=True)
            self._abort_task = None
        if self.unaborted and self._client is not None:
            try:  # one more try, bounded: shutting down must not wait on a dead S3
                await asyncio.wait_for(self._retry_aborts(), self.settings.connect_timeout)
            except TimeoutError:
                pass
        for upload_id, (bucket, s3_key) in self.unaborted.items():
            log.warning("multipart upload %s of %s/%s not aborted (S3 unreachable); the retention "
                        "cleanup removes it after orphan_grace_hours", upload_id, bucket, s3_key)
        if self._stack is not None:
            await self._stack.aclose()
            self._stack, self._client = None, None
        self._closing = False

    async def _ensure_buckets(self) -> None:
        for bucket in self.buckets:
            if bucket in self._ready_buckets:
                continue
            try:
                await self._client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _code(exc) not in _NOT_FOUND or not self.settings.create_bucket:
                    raise StorageError(f"bucket {bucket}: {exc}") from exc
                args: dict[str, Any] = {"Bucket": bucket}
                if self.settings.region != "us-east-1":
                    args["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
                try:
                    await self._client.create_bucket(**args)
                except ClientError as cexc:
                    if _code(cexc) not in ("BucketAlreadyOwnedByYou",):
                        raise StorageError(f"cannot create bucket {bucket}: {cexc}") from cexc
                log.info("created bucket %s", bucket)
            except BotoCoreError as exc:
                raise StorageError(f"S3 unreachable: {exc}") from exc
            self._ready_buckets.add(bucket)

    async def check(self) -> None:
        """HeadBucket on every bucket. Raises :class:`StorageError`."""
        try:
            for bucket in self.buckets:
                await self._client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 not ready: {exc}") from exc
        self._abort_wake.set()  # S3 answers: retry failed aborts now

    # -- multipart uploads left behind ----------------------------------------------------------
    async def _abort(self, bucket: str, s3_key: str, upload_id: str) -> bool:
        """AbortMultipartUpload; ``True`` once the upload is gone (NoSuchUpload counts).
        A failure is recorded in :attr:`unaborted` and retried by a background task."""
        try:
            await self._client.abort_multipart_upload(Bucket=bucket, Key=s3_key, UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) not in ("NoSuchUpload", "404"):
                return self._abort_failed(bucket, s3_key, upload_id, exc)
        except BotoCoreError as exc:
            return self._abort_failed(bucket, s3_key, upload_id, exc)
        if self.unaborted.pop(upload_id, None) is not None:
            log.info("aborted multipart upload %s of %s/%s on a later attempt", upload_id, bucket, s3_key)
        return True

    def _abort_failed(self, bucket: str, s3_key: str, upload_id: str, exc: Exception) -> bool:
        if upload_id not in self.unaborted:
            log.warning("could not abort multipart upload %s of %s/%s (%s); retrying in the background",
                        upload_id, bucket, s3_key, exc)
            self.unaborted[upload_id] = (bucket, s3_key)
        if not self._closing and (self._abort_task is None or self._abort_task.done()):
            self._abort_task = asyncio.create_task(self._abort_loop(), name="s3-abort-retry")
        return False

    async def _retry_aborts(self) -> None:
        for upload_id, (bucket, s3_key) in list(self.unaborted.items()):
            await self._abort(bucket, s3_key, upload_id)

    async def _abort_loop(self) -> None:
        """Retry :attr:`unaborted` with exponential backoff (1 s doubling up to
        :data:`ABORT_RETRY_MAX`), at once when a put or a readiness check got an answer from S3.
        Such a wake-up also starts the backoff again at 1 s: an abort that fails just as S3 comes
        back (a restarted server not quite ready) is tried again soon, not a minute later."""
        delay = 1.0
        while self.unaborted:
            try:
                await asyncio.wait_for(self._abort_wake.wait(), delay)
                answered = True
            except TimeoutError:
                answered = False
            # cleared before the retry, not before the wait: a wake-up that comes while a retry is
            # under way (S3 back during a slow failing abort) starts the next retry at once
            self._abort_wake.clear()
            await self._retry_aborts()
            delay = 1.0 if answered else min(delay * 2, ABORT_RETRY_MAX)

    async def incomplete_uploads(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        """ListMultipartUploads (paginated) over every bucket, under ``prefix``: every multipart
        upload neither completed nor aborted, the gateway's and anyone else's under the key prefix.
        Raises :class:`StorageError`."""
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            for bucket in self.buckets:
                async for page in paginator.paginate(Bucket=bucket, Prefix=self.settings.prefix + prefix):
                    for item in page.get("Uploads", []):
                        yield IncompleteUpload(key=self._unkey(item["Key"]), upload_id=item["UploadId"],
                                               started=item["Initiated"].timestamp(), bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 list multipart uploads: {exc}") from exc

    async def abort_upload(self, upload: IncompleteUpload) -> None:
        """AbortMultipartUpload of ``upload`` (already gone is fine). Raises :class:`StorageError`."""
        bucket = upload.bucket or self.settings.bucket
        try:
            await self._client.abort_multipart_upload(Bucket=bucket, Key=self._key(upload.key),
                                                      UploadId=upload.upload_id)
        except ClientError as exc:
            if _code(exc) not in ("NoSuchUpload", "404"):
                raise StorageError(f"S3 abort {bucket}/{upload.key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 abort {bucket}/{upload.key}: {exc}") from exc
        self.unaborted.pop(upload.upload_id, None)

    # -- objects ----------------------------------------------------------------------------
    def _object_args(self, content_type: str, metadata: dict[str, str]) -> dict[str, Any]:
        """Content-Type, Content-Disposition, SSE and the user metadata but ``sha256`` (which S3
        keeps as its checksum where it can: see the module's docstring)."""
        args: dict[str, Any] = {"ContentType": content_type, **self._sse(),
                                "Metadata": {k: _ascii(v) for k, v in metadata.items() if k != "sha256"}}
        if metadata.get("filename"):
            args["ContentDisposition"] = content_disposition(metadata["filename"], content_type)
        return args

    async def put(self, key: str, stream: AsyncIterator[bytes], content_type: str,
                  metadata: dict[str, str], category: str | None = None) -> PutResult:
        """Stream into S3 (single PUT or multipart). ``metadata`` is read after the stream ends;
        its ``sha256`` (hex), when there, goes to a single PUT as ``ChecksumSHA256``.

        Raises :class:`InvalidKey`, :class:`StorageError`, or what ``stream`` raises; a failed
        multipart upload is aborted (the abort is retried until it succeeds).
        """
        s3_key = self._key(key)
        bucket = self.bucket_for(category)
        try:
            await self._ensure_buckets()
            it = stream.__aiter__()
            first, ended = await _fill(io.BytesIO(), it, self.settings.multipart_threshold + 1)
            if ended:
                size = first.tell()
                first.seek(0)
                checksum = {}
                if len(metadata.get("sha256") or "") == 64:  # S3 checks the bytes against it
                    checksum = {"ChecksumSHA256": base64.b64encode(bytes.fromhex(metadata["sha256"])).decode()}
                resp = await self._client.put_object(Bucket=bucket, Key=s3_key, Body=first, **checksum,
                                                     **self._object_args(content_type, metadata))
                self._abort_wake.set()  # S3 answers: retry failed aborts now
                return PutResult(key=key, size=size, etag=resp.get("ETag"), bucket=bucket)
            pending = [first]  # handed over, so that this frame keeps no reference to part 1
            del first
            size, etag = await self._multipart(bucket, s3_key, pending, it, content_type, metadata)
            return PutResult(key=key, size=size, etag=etag, bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 put {bucket}/{s3_key}: {exc}") from exc

    async def _multipart(self, bucket: str, s3_key: str, pending: list[io.BytesIO], it: AsyncIterator[bytes],
                         content_type: str, metadata: dict[str, str]) -> tuple[int, str | None]:
        """Upload ``pending[0]`` and the rest of ``it`` as parts of at least ``part_size`` bytes.

        Each part is written into its own ``BytesIO`` (which the HTTP client sends without a copy)
        and dropped once uploaded; at most ``max_concurrency`` parts are in flight, one more fills.
        Parts carry a CRC32 checksum that S3 verifies; the object gets S3's CRC32 of the parts'.
        """
        part_size = self.settings.part_size
        created = await self._client.create_multipart_upload(
            Bucket=bucket, Key=s3_key, ChecksumAlgorithm="CRC32", **self._object_args(content_type, metadata))
        upload_id = created["UploadId"]
        self._abort_wake.set()  # S3 answers: retry failed aborts now
        parts: dict[int, dict[str, Any]] = {}
        slots = asyncio.Semaphore(self.settings.max_concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def upload(number: int, body: io.BytesIO) -> None:
            try:
                resp = await self._client.upload_part(Bucket=bucket, Key=s3_key, UploadId=upload_id,
                                                      PartNumber=number, Body=body, ChecksumAlgorithm="CRC32")
                parts[number] = {"PartNumber": number, "ETag": resp["ETag"]}
                if resp.get("ChecksumCRC32"):
                    parts[number]["ChecksumCRC32"] = resp["ChecksumCRC32"]
            finally:
                body.close()
                slots.release()

        try:
            size, number, ended = 0, 0, False
            part = pending.pop()
            while True:
                if not ended and part.tell() < part_size:
                    part, ended = await _fill(part, it, part_size)
                if part.tell() == 0:
                    break
                number += 1
                size += part.tell()
                part.seek(0)
                await slots.acquire()
                for t in [t for t in tasks if t.done()]:
                    tasks.discard(t)
                    t.result()  # surface a failed part now
                tasks.add(asyncio.create_task(upload(number, part)))
                part = io.BytesIO()
                if ended:
                    break
            await asyncio.gather(*tasks)
            done = await self._client.complete_multipart_upload(
                Bucket=bucket, Key=s3_key, UploadId=upload_id,
                MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]})
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.shield(self._abort(bucket, s3_key, upload_id))
            raise
        return size, done.get("ETag")

    async def open(self, key: str, start: int | None = None, end: int | None = None,
                   bucket: str | None = None) -> OpenedObject:
        """GetObject, with ``Range: bytes=start-end`` when asked. Raises :class:`ObjectNotFound`."""
        bucket = bucket or self.settings.bucket
        args: dict[str, Any] = {"Bucket": bucket, "Key": self._key(key)}
        if start is not None or end is not None:
            args["Range"] = f"bytes={start or 0}-{'' if end is None else end}"
        try:
            resp = await self._client.get_object(**args)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND or _code(exc) == "InvalidRange":
                if _code(exc) == "InvalidRange":
                    raise StorageError(f"range not satisfiable for {key}") from exc
                raise ObjectNotFound(key) from exc
            raise StorageError(f"S3 get {bucket}/{key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 get {bucket}/{key}: {exc}") from exc
        length = resp["ContentLength"]
        total = length
        first = start or 0
        if "ContentRange" in resp:  # bytes first-last/total
            span, _, total_s = resp["ContentRange"].removeprefix("bytes ").partition("/")
            first = int(span.split("-")[0])
            total = int(total_s)
        return OpenedObject(key=key, size=total, start=first, end=first + length - 1,
                            content_type=resp.get("ContentType"), chunks=_body_chunks(resp["Body"]))

    async def stat(self, key: str, bucket: str | None = None) -> ObjectStat:
        """HeadObject (with ``ChecksumMode``): ``metadata`` is the user metadata, plus ``sha256``
        (hex) when S3 holds the object's SHA-256 (single PUTs). Raises :class:`ObjectNotFound`."""
        bucket = bucket or self.settings.bucket
        try:
            resp = await self._client.head_object(Bucket=bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise ObjectNotFound(key) from exc
            raise StorageError(f"S3 head {bucket}/{key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 head {bucket}/{key}: {exc}") from exc
        metadata = dict(resp.get("Metadata", {}))
        sha256 = resp.get("ChecksumSHA256") or ""
        if sha256 and "-" not in sha256 and resp.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            metadata["sha256"] = base64.b64decode(sha256).hex()
        return ObjectStat(key=key, size=resp["ContentLength"], content_type=resp.get("ContentType"),
                          modified=resp["LastModified"].timestamp(), metadata=metadata)

    async def delete(self, key: str, bucket: str | None = None) -> bool:
        """DeleteObject; ``True`` if the object existed (HeadObject first)."""
        bucket = bucket or self.settings.bucket
        try:
            await self.stat(key, bucket=bucket)
        except ObjectNotFound:
            return False
        try:
            await self._client.delete_object(Bucket=bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 delete {bucket}/{key}: {exc}") from exc
        return True

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        """ListObjectsV2 (paginated) over every bucket."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for bucket in self.buckets:
                async for page in paginator.paginate(Bucket=bucket, Prefix=self.settings.prefix + prefix):
                    for item in page.get("Contents", []):
                        yield ObjectStat(key=self._unkey(item["Key"]), size=item["Size"], content_type=None,
                                         modified=item["LastModified"].timestamp(),
                                         metadata={"bucket": bucket})
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 list: {exc}") from exc

    async def url(self, key: str, expires: int, filename: str | None = None,
                  bucket: str | None = None, content_type: str | None = None) -> str | None:
        """A SigV4 presigned GET valid ``expires`` seconds, with response-content-disposition."""
        params: dict[str, Any] = {"Bucket": bucket or self.settings.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename, content_type or "")
        url: str = await self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)
        return url


def _ascii(value: str) -> str:
    """S3 user metadata travels in HTTP headers: keep it ASCII (RFC 2047 is not worth it here)."""
    return value.encode("ascii", "backslashreplace").decode()


async def _fill(buf: io.BytesIO, it: AsyncIterator[bytes], target: int) -> tuple[io.BytesIO, bool]:
    """Append chunks of ``it`` to ``buf`` until it holds at least ``target`` bytes or ``it`` ends;
    ``(buf, ended)``."""
    while buf.tell() < target:
        try:
            buf.write(await it.__anext__())
        except StopAsyncIteration:
            return buf, True
    return buf, False


async def _body_chunks(body: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in body.iter_chunks(READ_CHUNK):
            yield chunk
    finally:
        body.close()
