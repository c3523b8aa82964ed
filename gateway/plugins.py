"""The plugin manager: built-in and third-party plugins load the same way, from the entry-point
group ``gateway`` (DESIGN §3-4). The host never imports a plugin by name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar, cast

import pluggy
from pydantic import BaseModel

from gateway import hookspecs
from gateway.config import ConfigError, Settings, closest
from gateway.hookspecs import PROJECT, MediaInfo

GROUP = PROJECT
NOTIFICATIONS = ("media_stored", "media_updated", "media_deleted", "message_forwarded")
"""The notification hooks: run by :func:`notify`, after the commit, failures logged."""

log = logging.getLogger("gateway.plugins")
T = TypeVar("T")


class PluginLoadError(Exception):
    """A plugin failed to import or declares hooks the host does not know. Names the plugin."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``gateway plugins`` prints: entry-point name, module, distribution and version, hooks."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


def make_manager(load_entrypoints: bool = True, extra: list[Any] | None = None) -> pluggy.PluginManager:
    """A PluginManager with the gateway hookspecs, the entry-point plugins and ``extra`` objects.

    Raises :class:`PluginLoadError` naming the plugin that failed to import, or whose hook
    implementations match no hookspec (a misspelt hook fails loudly).
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    dists: dict[str, tuple[str | None, str | None]] = {}
    values: dict[str, str] = {}
    if load_entrypoints:
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            pm.register(plugin, name=ep.name)
            values[ep.name] = ep.value
            dists[ep.name] = (ep.dist.metadata["Name"], ep.dist.version) if ep.dist else (None, None)
    for obj in extra or []:
        pm.register(obj)
    _check_hooks(pm, values)
    pm.gateway_dists = dists  # type: ignore[attr-defined]
    return pm


def _check_hooks(pm: pluggy.PluginManager, values: dict[str, str]) -> None:
    """pluggy's ``check_pending``, with a message that names the plugin by its entry point
    (``name (module)``, or the class of an object registered directly) once, and the closest hook."""
    known = sorted(name for name in vars(pm.hook) if getattr(pm.hook, name).has_spec())
    for name, caller in sorted(vars(pm.hook).items()):
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            if impl.plugin_name in values:
                who = f"{impl.plugin_name} ({values[impl.plugin_name]})"
            else:
                who = type(impl.plugin).__qualname__ if not inspect.ismodule(impl.plugin) else impl.plugin.__name__
            raise PluginLoadError(f"plugin {who}: unknown hook {name!r}; did you mean {closest(name, known)!r}?")


def plugin_name(impl: pluggy.HookImpl) -> str:
    """How messages name the plugin of a hook implementation: its entry-point name, else the
    module or the class of an object registered directly."""
    if not inspect.ismodule(impl.plugin) and impl.plugin_name == str(id(impl.plugin)):
        return type(impl.plugin).__qualname__
    if inspect.ismodule(impl.plugin) and impl.plugin_name == str(id(impl.plugin)):
        return impl.plugin.__name__
    return impl.plugin_name


def _calls(pm: pluggy.PluginManager, hook_name: str, kwargs: dict[str, Any]
           ) -> Iterator[tuple[pluggy.HookImpl, list[Any]]]:
    """Each plain implementation of ``hook_name`` (wrappers left out) with the arguments it takes,
    in pluggy's call order (last registered first)."""
    caller = getattr(pm.hook, hook_name)
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        yield impl, [kwargs[name] for name in impl.argnames]


def offered(pm: pluggy.PluginManager, hook_name: str, settings: Settings, table: str) -> dict[str, Any]:
    """The objects a discovery hook (``register_providers``, ``register_storage``) offers, by
    ``name``. Raises :class:`ConfigError` when two plugins offer one name, naming both:
    ``providers.waha: offered by two plugins, whatsapp_waha and my_plugin``."""
    found: dict[str, tuple[str, Any]] = {}
    for impl, args in _calls(pm, hook_name, {"settings": settings}):
        objs = cast("list[Any] | None", impl.function(*args))
        for obj in objs or []:
            who = plugin_name(impl)
            if obj.name in found:
                first = found[obj.name][0]
                names = f"{first} and {who}" if first != who else f"{who} (twice)"
                raise ConfigError(f"{table}.{obj.name}: offered by two plugins, {names}")
            found[obj.name] = (who, obj)
    return {name: obj for name, (_, obj) in found.items()}


async def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Run the notification hook ``hook_name`` (one of :data:`NOTIFICATIONS`) with ``kwargs``,
    after the operation it reports has been committed.

    Each implementation runs on its own and is awaited if it returns an awaitable. One that raises
    is logged (one WARNING line naming the plugin and the error, no traceback) and does not stop
    the others, nor fail or undo the operation. Cancellation propagates.
    """
    for impl, args in _calls(pm, hook_name, kwargs):
        try:
            await await_me_maybe(impl.function(*args))
        except Exception as exc:
            log.warning("plugin %s: %s hook failed (ignored, the operation stands): %s: %s",
                        plugin_name(impl), hook_name, type(exc).__name__, exc,
                        extra={"plugin": plugin_name(impl), "hook": hook_name})


async def check_media(pm: pluggy.PluginManager, info: MediaInfo) -> str | None:
    """The first reason a ``check_media`` hook gives to refuse an attachment, else ``None``.

    Implementations may be sync or async (each result is awaited if awaitable, so an async
    implementation's coroutine is never taken for a truthy reason). A hook's exception
    propagates."""
    for result in pm.hook.check_media(info=info):
        reason = await await_me_maybe(result)
        if reason:
            return str(reason)
    return None


def section_models(pm: pluggy.PluginManager) -> dict[str, type[BaseModel]]:
    """Every plugin's settings sections, from the ``settings_sections`` hook:
    ``{"providers.waha": WahaSettings, "storage.local": LocalSettings, ...}``.

    Raises :class:`ConfigError` if two plugins claim one section.
    """
    models: dict[str, type[BaseModel]] = {}
    for result in pm.hook.settings_sections():
        for path, model in (result or {}).items():
            if path in models:
                raise ConfigError(f"{path}: claimed by two plugins")
            models[path] = model
    return models


def describe(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """One :class:`PluginInfo` per registered plugin, by name."""
    dists = getattr(pm, "gateway_dists", {})
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist_name, version = dists.get(name, (None, None))
        module = plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        infos.append(PluginInfo(name, module, dist_name, version, hooks))
    return sorted(infos, key=lambda i: i.name)


async def await_me_maybe(value: T | Awaitable[T]) -> T:
    """Await ``value`` if it is awaitable (hooks may return coroutines), else return it."""
    if inspect.isawaitable(value):
        return await value
    return value
