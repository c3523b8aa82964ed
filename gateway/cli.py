"""The command line: ``gateway serve | check-config | plugins`` (also ``python -m gateway``).

Exit status 2: the configuration is invalid (one line on stderr names the setting).
Exit status 1: a plugin failed to load (the line names the plugin).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from gateway.config import ConfigError, Settings, load_settings
from gateway.plugins import PluginLoadError, describe, make_manager

T = TypeVar("T")

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="GATEWAY_CONFIG", show_envvar=True,
    help="Path to gateway.toml (default: ./gateway.toml).",
)


def _settings(config_path: Path | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        click.echo(f"gateway: config error: {exc}", err=True)
        sys.exit(2)


def _or_exit(build: Callable[[], T]) -> T:
    """Run ``build``; a config error exits 2, a plugin that fails to load exits 1 (one line each)."""
    try:
        return build()
    except ConfigError as exc:
        click.echo(f"gateway: config error: {exc}", err=True)
        sys.exit(2)
    except PluginLoadError as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(package_name="chat-media-gateway")
def main() -> None:
    """Chat-media gateway: stores WhatsApp media durably and forwards messages to bots."""


@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Start the daemon. SIGTERM or Ctrl-C stops it gracefully."""
    from aiohttp import web

    from gateway.app import create_app
    from gateway.logs import setup_logging

    settings = _settings(config_path)
    setup_logging(settings.log)
    app = _or_exit(lambda: create_app(settings))
    log = logging.getLogger("gateway")
    log.info("listening on http://%s:%d (public URL %s)", settings.server.host, settings.server.port,
             settings.server.base_url)
    web.run_app(app, host=settings.server.host, port=settings.server.port, print=None,
                shutdown_timeout=settings.server.shutdown_grace, handle_signals=True)


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_path: Path | None) -> None:
    """Validate the configuration (including the plugins' sections) and exit."""
    from gateway.app import select_providers, select_storage

    settings = _settings(config_path)
    pm = _or_exit(make_manager)
    providers = _or_exit(lambda: select_providers(settings, pm))
    storage = _or_exit(lambda: select_storage(settings, pm))
    click.echo(f"ok: storage {storage.name}, providers {', '.join(providers) or 'none'}, "
               f"{len(settings.targets)} target(s), catalog {settings.catalog.path}")


@main.command()
def plugins() -> None:
    """List the plugins that loaded and the hooks each implements."""
    pm = _or_exit(make_manager)
    for info in describe(pm):
        dist = f"{info.distribution} {info.version}" if info.distribution else "-"
        click.echo(f"{info.name:<16} {info.module:<28} {dist:<28} {', '.join(info.hooks) or '(no hooks)'}")
