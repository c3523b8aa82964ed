"""Settings of the ``storage_s3`` storage backend (its section in ``gateway.toml``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator

from gateway.sdk import CATEGORIES, PluginSection

MiB = 1024 * 1024


class S3Settings(PluginSection):
    """``[storage.s3]``."""

    bucket: str = Field(min_length=3, max_length=63, description="the default bucket")
    endpoint_url: AnyHttpUrl | None = Field(None, description="MinIO or another S3-compatible server; absent for AWS")
    region: str = "us-east-1"
    prefix: str = Field("", description="prepended to every object key, e.g. 'gateway/'")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="'path' for MinIO and most S3-compatible servers")
    access_key_id: SecretStr | None = Field(None, description="absent: the standard AWS credential chain")
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = Field(None, description="with sse = 'aws:kms': the KMS key id or ARN")
    create_bucket: bool = Field(True, description="create missing buckets at start")
    category_buckets: dict[str, str] = Field(
        default_factory=dict, description="category -> bucket, e.g. {video = 'gateway-video'}")
    multipart_threshold: int = Field(8 * MiB, ge=5 * MiB, description="bytes from which multipart is used")
    # 5 MiB parts, 8 at once: as fast as boto3's upload_file (10 x 8 MiB) with 40 MiB of buffers
    # (bench/README.md); S3 allows 10,000 parts, so objects up to 48.8 GiB at this size
    part_size: int = Field(5 * MiB, ge=5 * MiB, le=5 * 1024 * MiB, description="multipart part size, bytes")
    max_concurrency: int = Field(8, ge=1, le=64, description="parts uploaded at once")
    connect_timeout: float = Field(5.0, gt=0, description="seconds")
    read_timeout: float = Field(60.0, gt=0, description="seconds")
    max_retries: int = Field(3, ge=0, description="botocore's own retries of one request")

    @model_validator(mode="after")
    def _check(self) -> S3Settings:
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ValueError("kms_key_id is required when sse = 'aws:kms'")
        unknown = set(self.category_buckets) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"category_buckets: unknown categories {sorted(unknown)}; "
                             f"allowed: {list(CATEGORIES)}")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        if self.prefix.startswith("/"):
            raise ValueError("prefix must not start with '/'")
        return self
