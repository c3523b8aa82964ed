"""Storage plugin ``s3``: AWS S3, MinIO and other S3-compatible servers, through aioboto3.

Follows the Amazon S3 API reference (PutObject, CreateMultipartUpload / UploadPart /
CompleteMultipartUpload / AbortMultipartUpload / ListMultipartUploads, GetObject with ``Range``,
HeadObject, DeleteObject, ListObjectsV2, HeadBucket, CreateBucket), its checksum guide
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html) and SigV4
presigned URLs.

- ``put`` streams: an object below ``multipart_threshold`` is one PutObject (at most that many
  bytes in memory); above it, a multipart upload of ``part_size`` parts (the first one
  ``multipart_threshold``) with at most ``max_concurrency`` parts in flight, so the buffered bytes
  stay under ``multipart_threshold + max_concurrency * part_size`` (plus one chunk a part).
  Nothing is copied after the upload.
- What the object carries: user metadata known before the first byte is sent
  (``x-amz-meta-media-id``, ``x-amz-meta-filename``), Content-Type and Content-Disposition, and
  S3's own checksum, which S3 verifies on arrival: a single PutObject sends the gateway's SHA-256
  (``x-amz-checksum-sha256``, so S3 refuses bytes that differ from what the gateway hashed); a
  multipart object has a CRC32 per part and S3's CRC32 of those (``…-N``). The SHA-256 of every
  object is in the catalog; :meth:`S3Storage.stat` reports it (hex) when S3 has it.
- A multipart upload that fails is aborted. An abort that fails too (S3 down) is recorded and
  retried in the background (and at once when S3 answers again) until it succeeds; uploads a crash
  left behind are listed by :meth:`S3Storage.incomplete_uploads` for the retention cleanup's sweep.
- Server-side encryption is ``none``, ``AES256`` or ``aws:kms`` (with ``kms_key_id``).
- Objects may go to a bucket per category (``[storage.s3.category_buckets]``); the bucket is
  returned by ``put`` and recorded in the catalog.
- One client per app, opened in :meth:`S3Storage.start` and closed in :meth:`S3Storage.close`
  (both called from the app's cleanup_ctx). If S3 is unreachable at start, the daemon starts
  anyway: ``/readyz`` says not ready, and bucket creation is tried again before the next write.
"""

from __future__ import annotations

from gateway.sdk import Settings, hookimpl, plugin_settings
from plugins.storage_s3.backend import S3Storage
from plugins.storage_s3.settings import S3Settings

__all__ = ["S3Storage", "S3Settings", "register_storage", "settings_sections"]


@hookimpl
def settings_sections() -> dict[str, type[S3Settings]]:
    """``[storage.s3]`` is this plugin's section."""
    return {"storage.s3": S3Settings}


@hookimpl
def register_storage(settings: Settings) -> list[S3Storage] | None:
    """Offer the ``s3`` backend when ``storage.backend = "s3"``."""
    if settings.storage.backend != S3Storage.name:
        return None
    return [S3Storage(plugin_settings(settings, ("storage", "s3"), S3Settings))]
