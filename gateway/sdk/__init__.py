"""The plugin SDK: the one import surface for gateway plugins (DESIGN §3-4).

A plugin (a provider or a storage backend, built-in or third-party) imports from here and from
nowhere else in ``gateway``::

    from gateway.sdk import hookimpl, PluginSection, Settings, plugin_settings, StorageBackend, ...

- hook markers: :data:`hookimpl` (the hooks are listed in :mod:`gateway.hookspecs`) and what
  hooks receive (:class:`MediaInfo` for ``check_media``, :data:`MediaRecord` for notifications);
- the provider contract and its records: :mod:`gateway.sdk.provider`;
- the storage-backend contract and its records: :mod:`gateway.sdk.storage`;
- the outbound interface a provider's relay uses: :mod:`gateway.sdk.outbound`;
- provider downloads (timeouts, ``Range`` resume): :mod:`gateway.sdk.download`;
- relay plumbing (forward a request, stream a proxy): :mod:`gateway.sdk.relay` (a module:
  ``from gateway.sdk import relay``);
- host helpers re-exported for plugins: the media rules plugins need (:func:`base_mime`,
  :data:`CATEGORIES`, :func:`content_disposition`, :class:`MediaStream`, :class:`MediaTooLarge`)
  and the settings helpers (:class:`Settings`, :class:`PluginSection`, :func:`plugin_settings`,
  :class:`ConfigError`);
- the contract test suites: :mod:`gateway.sdk.testing`, a pytest plugin (entry point ``pytest11``).
"""

from gateway.config import ConfigError, PluginSection, Settings, plugin_settings
from gateway.media import (
    CATEGORIES,
    MediaStream,
    MediaTooLarge,
    base_mime,
    content_disposition,
)
from gateway.sdk import relay
from gateway.sdk.download import BODY_ERRORS, DownloadPolicy, resumable_body
from gateway.sdk.hooks import PROJECT, MediaInfo, MediaRecord, hookimpl, hookspec
from gateway.sdk.outbound import MediaUnavailable, Origin, OutboundService
from gateway.sdk.provider import (
    MAX_JSON_DEPTH,
    OUTBOUND_TYPES,
    FetchError,
    MediaOutcome,
    MediaRef,
    MediaSource,
    OutboundMedia,
    PayloadError,
    Provider,
    ProviderContext,
    RouteDef,
    SendError,
    SendRefused,
    SendRequest,
    SendResult,
    SignatureError,
    WebhookEvent,
    copy_path,
    load_json,
    signature_matches,
    storable,
)
from gateway.sdk.storage import (
    FILE_READ_BYTES,
    IncompleteUpload,
    IncompleteUploads,
    LocalFiles,
    InvalidKey,
    ObjectNotFound,
    ObjectStat,
    OpenedObject,
    PutResult,
    StorageBackend,
    StorageError,
    file_range,
)

__all__ = [
    # hooks
    "PROJECT", "hookimpl", "hookspec", "MediaInfo", "MediaRecord",
    # provider contract
    "Provider", "ProviderContext", "RouteDef", "WebhookEvent", "MediaRef", "MediaSource", "MediaOutcome",
    "OutboundMedia", "SendRequest", "SendResult", "OUTBOUND_TYPES",
    "SignatureError", "PayloadError", "FetchError", "SendError", "SendRefused",
    "MAX_JSON_DEPTH", "load_json", "storable", "signature_matches", "copy_path",
    # storage contract
    "StorageBackend", "IncompleteUploads", "IncompleteUpload", "LocalFiles", "PutResult", "ObjectStat", "OpenedObject",
    "file_range", "FILE_READ_BYTES",
    "StorageError", "ObjectNotFound", "InvalidKey",
    # outbound interface
    "OutboundService", "Origin", "MediaUnavailable", "relay",
    # downloads
    "DownloadPolicy", "resumable_body", "BODY_ERRORS",
    # host helpers
    "CATEGORIES", "base_mime", "content_disposition", "MediaStream", "MediaTooLarge",
    "Settings", "PluginSection", "plugin_settings", "ConfigError",
]
