"""Settings: ``gateway.toml`` plus environment overrides, typed and validated at start.

Sources, highest priority first:

1. environment variables ``GATEWAY_<SECTION>__<KEY>`` (``__`` separates nesting levels), e.g.
   ``GATEWAY_SERVER__PORT=9000`` or ``GATEWAY_PROVIDERS__WAHA__API_KEY=...``;
2. the TOML file given to :func:`load_settings`.

Any string value may be written as ``${ENV_NAME}`` (or contain such references); they are replaced
from the environment before validation, and a reference to an unset variable is a config error.

Relative paths (catalog, local storage root) are resolved against the directory of the TOML file,
so the daemon behaves the same whatever the working directory.

A bad value raises :class:`ConfigError` whose message names the setting in dotted form
(``server.port: Input should be less than or equal to 65535``); the CLI prints it on one line and
exits with status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import urllib.parse
import string
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.cron import crontab_trigger

MiB = 1024 * 1024
DEFAULT_KEY_TEMPLATE = "{provider}/{account}/{yyyy}/{mm}/{dd}/{category}/{id}{ext}"
KEY_TEMPLATE_FIELDS = {"provider", "account", "yyyy", "mm", "dd", "category", "id", "ext"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

M = TypeVar("M", bound=BaseModel)
_UNSET: ContextVar[dict[str, str]] = ContextVar("gateway_unset_env", default={})


class ConfigError(Exception):
    """A setting is missing or invalid. ``str(err)`` is one line that starts with the setting name."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginSection(BaseModel):
    """Base of a plugin's settings model (``[providers.<name>]``, ``[storage.<name>]``).

    Unknown keys are errors. List and table settings may come from the environment as JSON
    (``GATEWAY_PROVIDERS__META__DOWNLOAD_HOSTS='["a.example"]'``): the host cannot type a plugin's
    section, so such strings are decoded here, for fields whose type is a list or a dict only.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _json_from_env(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            value = out.get(name)
            origin = getattr(field.annotation, "__origin__", field.annotation)
            if isinstance(value, str) and origin in (list, dict) and value.strip()[:1] in ("[", "{"):
                try:
                    out[name] = json.loads(value)
                except ValueError:
                    pass  # left as is: validation names the setting
        return out


class ServerSettings(_Section):
    """``[server]``: where the daemon listens and how it names itself in links."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: AnyHttpUrl | None = Field(
        None, description="Base of the links the gateway hands out; default http://{host}:{port}"
    )
    max_webhook_bytes: int = Field(4 * MiB, ge=1024, description="largest webhook body accepted, bytes")
    shutdown_grace: float = Field(
        30.0, ge=0, description="seconds running jobs get to finish on SIGTERM before they go back to the queue"
    )

    @property
    def base_url(self) -> str:
        """The public base URL without a trailing slash."""
        if self.public_url is not None:
            return str(self.public_url).rstrip("/")
        return f"http://{self.host}:{self.port}"


class ServingSettings(_Section):
    """``[serving]``: serving processes for stored media. With ``workers`` > 0 the daemon starts
    that many processes that answer only ``/media/...`` and ``/public/...`` on their own port
    (one listening socket they share), and new media links point at them; the daemon's own
    port keeps serving the same links."""

    workers: int = Field(0, ge=0, le=64, description="serving processes; 0: the daemon serves media alone")
    host: str | None = Field(None, description="address the serving processes listen on; default server.host")
    port: int = Field(8081, ge=1, le=65535, description="port the serving processes listen on")
    public_url: AnyHttpUrl | None = Field(
        None, description="base of media links while workers run; default http://{host}:{port}")


class CatalogSettings(_Section):
    """``[catalog]``: the database that holds events, jobs and the media catalog: the SQLite file
    ``path`` (the default, one daemon), or the PostgreSQL database ``url`` shared by several
    replicas (``path``'s directory still holds each replica's local files)."""

    path: Path = Path("var/gateway.db")
    url: str | None = Field(
        None, description="postgresql://user:password@host:5432/dbname: a PostgreSQL catalog shared by "
                          "replicas instead of the SQLite file; empty: SQLite")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql://user:password@host:port/dbname URL (or empty for SQLite)")
        if not parts.path.strip("/"):
            raise ValueError("must name the database: postgresql://user:password@host:port/dbname")
        return value

    def describe(self) -> str:
        """The catalog for messages: the SQLite path, or the PostgreSQL URL without its password."""
        if not self.url:
            return str(self.path)
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class MediaSettings(_Section):
    """``[media]``: limits and naming for stored media, and the signed links to it."""

    max_bytes: int = Field(100 * MiB, ge=1, description="largest attachment stored, bytes")
    key_template: str = DEFAULT_KEY_TEMPLATE
    link_ttl: int = Field(7 * 24 * 3600, ge=1, description="lifetime of signed media links, seconds")
    link_secret: SecretStr = Field(
        SecretStr(""),
        description="HMAC key for media links; empty: a random key kept in <catalog dir>/link.secret",
    )
    type_mismatch: Literal["other", "reject"] = Field(
        "other",
        description="content contradicts the declared type: store under the sniffed type, or refuse",
    )
    fetch_timeout: float = Field(
        300.0, gt=0,
        description="seconds one provider download may take, plus its declared size at fetch_min_rate")
    fetch_min_rate: int = Field(
        100 * 1024, ge=1,
        description="bytes per second a download's total timeout allows for (with fetch_timeout)")
    fetch_idle_timeout: float = Field(
        30.0, gt=0, description="seconds a provider download may go without sending a byte")
    fetch_resumes: int = Field(
        3, ge=0, le=100, description="Range requests that resume a broken download, per attempt")
    fetch_connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to a provider")
    fetch_thread_min_bytes: int = Field(
        8 * 1024 * 1024, ge=0,
        description="a download declaring at least this many bytes (plain HTTP, no content coding) is "
                    "read by a thread of its own instead of the event loop (0: never)")

    @field_validator("key_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        unknown = fields - KEY_TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"unknown field(s) {sorted(unknown)}; allowed: {sorted(KEY_TEMPLATE_FIELDS)}"
            )
        if "id" not in fields:
            raise ValueError("must contain {id} so that every object gets its own key")
        sample = value.format(provider="p", account="a", yyyy="2000", mm="01", dd="01",
                              category="image", id="m_1", ext=".jpg")
        if sample.startswith("/") or any(p in ("", ".", "..") for p in sample.split("/")):
            raise ValueError("must give a relative key without empty, '.' or '..' segments")
        return value


class StorageSettings(BaseModel):
    """``[storage]``: ``backend`` names the storage plugin; ``[storage.<backend>]`` is its own section."""

    model_config = ConfigDict(extra="allow")

    backend: str = "local"
    serving: Literal["proxy", "redirect"] = Field(
        "proxy",
        description="proxy: /media streams through the gateway; redirect: 302 to the backend's "
                    "presigned URL where it has one (after the gateway's own signature check)",
    )


class QueueSettings(_Section):
    """``[queue]``: the durable job queue's lanes, workers and retry policy, and the deadline of
    webhook media (DESIGN §6)."""

    workers: int = Field(16, ge=1, le=256, description="deliver lane: deliveries to bots run at once")
    fetch_workers: int = Field(32, ge=1, le=256, description="fetch lane: media downloads run at once")
    media_deadline: float = Field(
        180.0, gt=0, description="seconds after a webhook that its provider may delete the media (WAHA: 180)")
    media_deadlines: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="media_deadline per provider name, overriding it")
    backlog_ready_fraction: float = Field(
        0.5, gt=0, le=1, description="/readyz is 503 when the oldest waiting media has used this "
                                     "fraction of its deadline")
    admission_fraction: float = Field(
        0.5, gt=0, le=1, description="media webhooks are answered 503 + Retry-After while storing the waiting "
                                     "media (waiting ÷ recent store rate) would take more than this fraction "
                                     "of the provider's media_deadline")
    admission_hold: float = Field(
        1.0, ge=0, le=30, description="seconds a media webhook over admission_fraction waits for room "
                                      "before its 503")
    max_attempts: int = Field(8, ge=1, description="attempts before a job goes dead")
    backoff_base: float = Field(2.0, gt=0, description="seconds before the first retry; doubles each attempt")
    backoff_max: float = Field(600.0, gt=0, description="longest wait between attempts, seconds")
    poll_interval: float = Field(1.0, gt=0, description="seconds between looks for due retries")
    lease: float = Field(
        30.0, ge=1, le=3600, description="seconds a replica's claim on a running job lasts without renewal "
                                         "(renewed every third of it); a dead replica's jobs run again after it "
                                         "(PostgreSQL catalog)")


class TargetSettings(_Section):
    """``[[targets]]``: one bot webhook that gets every (rewritten) message."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: AnyHttpUrl
    secret: SecretStr | None = Field(None, description="HMAC-SHA256 key for X-Gateway-Signature")
    events: list[str] = Field(default_factory=list, description="event names to forward; empty: all")
    timeout: float = Field(30.0, gt=0, description="seconds one delivery may take")


class FetchSettings(_Section):
    """``[fetch]``: fetching URLs that callers give (bots' media URLs, upload-from-URL).

    Only public addresses are contacted (checked after DNS resolution and on every redirect),
    except the networks listed in ``allow_networks``.
    """

    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs allowed although not public, e.g. ['10.1.0.0/16']")
    timeout: float = Field(120.0, gt=0, description="seconds one fetch may take")
    max_redirects: int = Field(5, ge=0, le=20)

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not a network: {exc}") from None
        return value


class ApiKeySettings(_Section):
    """``[[api.keys]]``: one API key for the management and send APIs (``Authorization: Bearer``).

    Give the key itself (``key``, ideally ``"${ENV_NAME}"``) or its SHA-256 hex (``key_sha256``,
    e.g. ``printf %s "$KEY" | sha256sum``). ``scopes``: ``read``, ``write``, ``admin`` (admin
    implies the others). ``tenant``: the key sees only objects of that tenant.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    scopes: list[Literal["read", "write", "admin"]] = ["read"]  # pydantic copies a mutable default per instance
    tenant: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeySettings:
        if (self.key is None or not self.key.get_secret_value()) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        return self

    def digest(self) -> str:
        """The key's SHA-256, lower-case hex."""
        if self.key_sha256:
            return self.key_sha256.lower()
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()


class ApiSettings(_Section):
    """``[api]``: who may call the HTTP APIs."""

    keys: list[ApiKeySettings] = Field(default_factory=list)
    metrics_key: bool = Field(False, description="require an API key (any scope) for /metrics")


class LogSettings(_Section):
    """``[log]``: level and format (``auto``: JSON lines unless stderr is a terminal)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


def _max_age_days(value: Any) -> Any:
    if value == "forever":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'must be a number of days above 0 or "forever", got {value!r}')
    return float(value)


MaxAgeDays = Annotated[float | str, BeforeValidator(_max_age_days)]
"""An age in days (fractions allowed), or ``"forever"``: never by age."""


class RetentionSettings(_Section):
    """``[retention]``: the scheduled cleanup of stored media and of the catalog
    (:mod:`gateway.retention`; ``gateway cleanup`` and ``POST /api/v1/admin/cleanup`` run it by hand).

    Ages are in days (fractions allowed) or ``"forever"``. An object's maximum age is the longest of
    its provider's (``provider_max_age_days``) and its category's (``category_max_age_days``) when
    either is set, else ``max_age_days``: when two rules disagree, keeping wins. An object whose own
    ``expires_at`` has passed goes whatever its age.
    """

    enabled: bool = Field(True, description="run on the schedule (the CLI and the admin endpoint work either way)")
    schedule: str = Field(
        "17 3 * * *",
        description="crontab line: minute hour day-of-month month day-of-week (0 or 7 = Sunday, or sun..sat)",
    )
    timezone: str = Field("UTC", description="IANA time zone the schedule is read in")
    max_age_days: MaxAgeDays = Field(90.0, description="maximum age of a stored object when no rule below applies")
    category_max_age_days: dict[str, MaxAgeDays] = Field(
        default_factory=dict, description="category (image, video, audio, document, other) -> maximum age")
    provider_max_age_days: dict[str, MaxAgeDays] = Field(
        default_factory=dict, description="provider name (waha, meta, ...) -> maximum age")
    keep_public: bool = Field(True, description="objects marked public are never deleted for their age")
    batch_size: int = Field(500, ge=1, le=10_000, description="catalog rows read, claimed or deleted per transaction")
    reconcile: bool = Field(
        True,
        description="list the storage on every run: delete orphans (objects without a catalog row) and mark "
                    "rows whose object is gone as missing",
    )
    orphan_grace_hours: float = Field(
        24.0, ge=0, description="an object without a catalog row is deleted only once it is this old")
    events_max_age_days: MaxAgeDays = Field(
        30.0, description="received events (raw webhooks) are pruned after this, once all their jobs are done")
    done_jobs_max_age_days: MaxAgeDays = Field(7.0, description="finished (done) jobs are pruned after this")

    @field_validator("category_max_age_days")
    @classmethod
    def _check_categories(cls, value: dict[str, Any]) -> dict[str, Any]:
        from gateway.media import CATEGORIES

        unknown = sorted(set(value) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"known: {list(CATEGORIES)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from None
        return value

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        crontab_trigger(value)  # ValueError names the bad field
        return value


def expand_env_refs(value: Any, path: str = "", unset: dict[str, str] | None = None) -> Any:
    """Replace ``${NAME}`` references in every string of ``value`` (nested dicts and lists).

    A reference to an unset variable raises ``ValueError`` naming the setting path, unless
    ``unset`` is given: then it is left as written and recorded there (``{path: NAME}``).
    """
    if isinstance(value, str):
        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                if unset is None:
                    raise ValueError(f"{path or 'value'}: environment variable {name} is not set")
                unset.setdefault(path, name)
                return match.group(0)
            return os.environ[name]

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: expand_env_refs(v, f"{path}.{k}" if path else str(k), unset) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env_refs(v, f"{path}[{i}]", unset) for i, v in enumerate(value)]
    return value


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`, not directly."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    targets: list[TargetSettings] = Field(default_factory=list)
    config_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    config_file: Path | None = Field(None, exclude=True)
    """The TOML file the settings were read from (None: the environment only); the serving
    workers read it again."""
    unset_env: dict[str, str] = Field(default_factory=dict, exclude=True)
    """Settings whose ``${NAME}`` reference names an unset variable: ``{path: NAME}``. They keep
    the reference as written; :meth:`require_env` refuses them for the commands that use them."""

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unset: dict[str, str] = {}
        _UNSET.set(unset)  # read by load_settings when validation fails
        out = {k: expand_env_refs(v, k, unset) if k not in ("config_dir", "config_file") else v
               for k, v in data.items() if k != "unset_env"}
        out["unset_env"] = unset
        return out

    def require_env(self, *prefixes: str) -> None:
        """Raise :class:`ConfigError` (one line per setting) if a setting under one of
        ``prefixes`` (all settings when none is given) refers to an unset environment variable.
        ``gateway cleanup`` requires only what it uses, so a bot's key missing from cron's
        environment does not stop it; the daemon requires everything."""
        def used(path: str) -> bool:
            return not prefixes or any(path == p or path.startswith((p + ".", p + "[")) for p in prefixes)

        lines = [f"{path}: environment variable {name} is not set"
                 for path, name in self.unset_env.items() if used(path)]
        if lines:
            raise ConfigError("\n".join(lines))

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        if not self.catalog.path.is_absolute():
            self.catalog.path = (self.config_dir / self.catalog.path).resolve()
        if self.catalog.url and not self.media.link_secret.get_secret_value():
            raise ValueError("media.link_secret: must be set when catalog.url is set "
                             "(every replica signs and checks media links with the same key)")
        names = [t.name for t in self.targets]
        if len(names) != len(set(names)):
            raise ValueError("targets: names must be unique")
        if self.serving.workers and (self.serving_host, self.serving.port) == (self.server.host, self.server.port):
            raise ValueError("serving.port: must differ from server.port while serving.workers > 0")
        key_names = [k.name for k in self.api.keys]
        if len(key_names) != len(set(key_names)):
            raise ValueError("api.keys: names must be unique")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def serving_host(self) -> str:
        """The address the serving workers listen on: ``serving.host``, default ``server.host``."""
        return self.serving.host or self.server.host

    @property
    def media_base_url(self) -> str:
        """The base of newly made media links, without a trailing slash: the serving workers'
        (``serving.public_url``, default ``http://{serving host}:{serving.port}``) while
        ``serving.workers`` > 0, else :attr:`ServerSettings.base_url`."""
        if not self.serving.workers:
            return self.server.base_url
        if self.serving.public_url is not None:
            return str(self.serving.public_url).rstrip("/")
        return f"http://{self.serving_host}:{self.serving.port}"

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the settings, made absolute against the config file's directory."""
        p = Path(value)
        return p if p.is_absolute() else (self.config_dir / p).resolve()

    def section(self, *path: str) -> dict[str, Any]:
        """The raw dict at ``path`` (for plugins' own sections), ``{}`` when absent.

        ``settings.section("providers", "waha")`` is ``[providers.waha]``;
        ``settings.section("storage", "local")`` is ``[storage.local]``.
        """
        node: Any = self.model_dump(exclude={"config_dir", "unset_env"})
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return {}
            node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: must be a table, got {type(node).__name__}")
        return node

    def link_secret(self) -> bytes:
        """The media-link HMAC key: the setting, or a random key persisted next to the catalog."""
        configured = self.media.link_secret.get_secret_value()
        if configured:
            return configured.encode()
        path = self.catalog.path.parent / "link.secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        return path.read_bytes().strip()


def format_loc(loc: tuple[Any, ...] | list[Any], prefix: str = "") -> str:
    """A setting's path in one style: ``targets[0].name``, ``api.keys[1].key``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(model: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class reached from ``model`` along ``loc`` (list indexes and dict keys
    step into the item type), or None when ``loc`` leaves the typed settings."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):  # a list index: the item type was reached with the list
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = field.annotation
        while True:  # unwrap Optional[...], list[...], dict[str, ...] to the model they hold
            args = [a for a in typing.get_args(current) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if models:
                current = models[-1]
            elif len(args) == 1:
                current = args[0]
            else:
                break
            if isinstance(current, type) and issubclass(current, BaseModel):
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def closest(name: str, candidates: Any) -> str | None:
    """The candidate closest to ``name`` (difflib's ratio), or None when there is none."""
    import difflib

    ranked = sorted(candidates, key=lambda c: difflib.SequenceMatcher(None, name, c).ratio(), reverse=True)
    return ranked[0] if ranked else None


def unknown_setting(path: str, name: str, candidates: Any, what: str = "setting") -> str:
    """``<path>: unknown <what>; did you mean <closest>?`` (one line)."""
    best = closest(name, candidates)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    return f"{path}: unknown {what}" + (f"; did you mean {parent}{best}?" if best else "")


def _unset_refs(value: Any) -> list[str]:
    return [n for n in _ENV_REF.findall(value) if n not in os.environ] if isinstance(value, str) else []


def validation_lines(err: ValidationError, prefix: str = "", model: Any = None) -> list[str]:
    """One line per pydantic error: ``<setting path>: <message>``. Unknown keys name the closest
    valid one when ``model`` (the validated class) is given; a value still holding an unset
    ``${ENV}`` reference says so."""
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = format_loc(loc, prefix)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1]) if model is not None else None
            line = unknown_setting(path, str(loc[-1]), owner.model_fields if owner else [])
        elif _unset_refs(e.get("input")):
            line = f"{path}: environment variable {_unset_refs(e['input'])[0]} is not set"
        else:
            line = f"{path}: {msg}" if path else msg
        if line not in lines:
            lines.append(line)
    return lines


def format_validation_error(err: ValidationError, prefix: str = "", model: Any = None,
                            sep: str = "; ") -> str:
    """Every error of ``err`` (see :func:`validation_lines`), joined with ``sep``."""
    return sep.join(validation_lines(err, prefix, model))


def load_settings(path: str | Path | None = None, uses: tuple[str, ...] | None = None) -> Settings:
    """Read ``path`` (default ``./gateway.toml`` if it exists) and the environment.

    ``uses``: the top-level sections (or dotted settings) the caller needs; a ``${NAME}``
    reference to an unset variable elsewhere is left as written (see :meth:`Settings.require_env`).
    None: every setting is needed.

    Raises :class:`ConfigError` whose message has one line per bad setting, each naming it
    (an unknown one with the closest valid name).
    """
    if path is None:
        path = Path("gateway.toml")
        if not path.exists():
            path = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file {path} not found")
    config_dir = path.resolve().parent if path is not None else Path.cwd()

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    _UNSET.set({})
    try:
        settings = _FileSettings(config_dir=config_dir, config_file=path.resolve() if path is not None else None)
    except ValidationError as err:
        lines = validation_lines(err, model=Settings)
        lines += [f"{p}: environment variable {n} is not set" for p, n in _UNSET.get().items()
                  if not any(line.startswith(p + ":") for line in lines)]
        raise ConfigError("\n".join(lines)) from None
    except (ValueError, OSError) as err:  # TOML syntax errors, unreadable file
        raise ConfigError(f"config: {err}") from None
    settings.require_env(*(uses or ()))
    return settings


def plugin_settings(settings: Settings, path: tuple[str, ...], model: type[M]) -> M:
    """Validate a plugin's own section (e.g. ``("providers", "waha")``) with its pydantic model
    (a :class:`PluginSection`: unknown keys are refused, naming the closest valid one).

    Raises :class:`ConfigError` naming the full dotted setting, e.g. ``providers.waha.base_url: ...``,
    one line per problem.
    """
    try:
        return model.model_validate(settings.section(*path))
    except ValidationError as err:
        raise ConfigError("\n".join(validation_lines(err, prefix=".".join(path), model=model))) from None


PLUGIN_TABLES = ("providers", "storage")
"""The top-level tables whose sub-tables belong to plugins (``[providers.<name>]``,
``[storage.<name>]``)."""


def check_plugin_sections(settings: Settings, models: dict[str, type[BaseModel]]) -> None:
    """Refuse plugin sections no installed plugin owns, and validate every present one with its
    owner's model (also when its plugin is not selected, so a typo in ``[storage.s3]`` shows while
    the backend is still ``local``). ``models``: ``{"providers.waha": WahaSettings, ...}``
    (:func:`gateway.plugins.section_models`). Also refuses non-table keys of ``[storage]`` that
    are not settings.

    Raises :class:`ConfigError`, one line per problem, each naming the closest valid name.
    """
    lines: list[str] = []
    present: list[tuple[str, Any]] = []
    for key, value in (settings.storage.model_extra or {}).items():
        if isinstance(value, dict):
            present.append((f"storage.{key}", value))
        else:
            owned = [m.split(".", 1)[1] for m in models if m.startswith("storage.")]
            lines.append(unknown_setting(f"storage.{key}", key, [*StorageSettings.model_fields, *owned]))
    present += [(f"providers.{k}", v) for k, v in settings.providers.items()]
    for path, value in present:
        table, name = path.split(".", 1)
        if path not in models:
            owned = [m.split(".", 1)[1] for m in models if m.startswith(table + ".")]
            lines.append(unknown_setting(path, name, owned, what="section (no installed plugin owns it)"))
            continue
        try:
            models[path].model_validate(settings.section(table, name))
        except ValidationError as err:
            lines.extend(line for line in validation_lines(err, prefix=path, model=models[path])
                         if line.split(":", 1)[0] not in settings.unset_env)  # see require_env
    if lines:
        raise ConfigError("\n".join(lines))
