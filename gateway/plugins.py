"""The plugin manager: built-in and third-party plugins load the same way, from the entry-point
group ``gateway`` (DESIGN §3-4). The host never imports a plugin by name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from gateway import hookspecs

GROUP = "gateway"


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
            dists[ep.name] = (ep.dist.metadata["Name"], ep.dist.version) if ep.dist else (None, None)
    for obj in extra or []:
        pm.register(obj)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"plugin {exc.plugin!r}: {exc}") from exc
    pm.gateway_dists = dists  # type: ignore[attr-defined]
    return pm


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


async def await_me_maybe(value: Any) -> Any:
    """Await ``value`` if it is awaitable (hooks may return coroutines), else return it."""
    if inspect.isawaitable(value):
        return await value
    return value
