"""The hooks' contracts (gateway/hookspecs.py, gateway/plugins.py): an async ``check_media`` is
awaited, notification listeners that fail are logged and change nothing, and two plugins offering
one name stop the start naming both."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app, select_providers, select_storage
from gateway.config import ConfigError, Settings
from gateway.plugins import make_manager, notify
from gateway.sdk import hookimpl
from tests.conftest import MEDIA, Gateway, base_config, deep_merge, waha_payload


class AsyncScanner:
    """A virus scanner as a plugin: ``check_media`` is a coroutine, awaited by the host."""

    def __init__(self, refuse: bool):
        self.refuse = refuse
        self.seen: list[str] = []

    @hookimpl
    async def check_media(self, info: dict[str, Any]) -> str | None:
        await asyncio.sleep(0)
        self.seen.append(info["mimetype"])
        return "virus found" if self.refuse else None


class BrokenListener:
    """A plugin whose notification hooks all raise."""

    @hookimpl
    def media_stored(self, record: dict[str, Any]) -> None:
        raise RuntimeError("listener down")

    @hookimpl
    async def message_forwarded(self, event_id: str, target: str, status: int) -> None:
        raise RuntimeError("listener down too")


class Listener:
    """A plugin that records the notifications it gets."""

    def __init__(self) -> None:
        self.stored: list[str] = []

    @hookimpl
    async def media_stored(self, record: dict[str, Any]) -> None:
        self.stored.append(record["id"])


async def _gateway(aiohttp_server, port: int, tmp_path: Path, waha, sink, http, *plugins: object) -> Gateway:
    settings = Settings(config_dir=tmp_path, **base_config(tmp_path, port, waha, sink))
    app = create_app(settings, make_manager(extra=list(plugins)))
    server = await aiohttp_server(app, host="127.0.0.1", port=port)
    return Gateway(str(server.make_url("")).rstrip("/"), app, settings, http)


@pytest.mark.parametrize("refuse", [True, False], ids=["refuses", "accepts"])
async def test_an_async_check_media_is_awaited(aiohttp_server, unused_tcp_port, tmp_path, waha, sink, http,
                                               refuse):
    scanner = AsyncScanner(refuse)
    gw = await _gateway(aiohttp_server, unused_tcp_port, tmp_path, waha, sink, http, scanner)
    url = waha.add_file(MEDIA / "photo.jpg")
    assert (await gw.post_waha(waha_payload(url, message_id="scan-1"))).status == 200
    [delivery] = await sink.wait_for(1, timeout=10)
    assert scanner.seen == ["image/jpeg"]
    if refuse:
        assert delivery.json["gateway"]["notes"] == [
            {"path": "payload.media", "error": "refused by policy: virus found"}]
        assert gw.object_files() == []
    else:
        assert delivery.json["gateway"]["notes"] == []
        assert "gateway" in delivery.json["payload"]["media"]
        assert len(gw.object_files()) == 1


async def test_a_failing_listener_is_logged_and_changes_nothing(aiohttp_server, unused_tcp_port, tmp_path,
                                                                waha, sink, http, caplog):
    listener = Listener()
    gw = await _gateway(aiohttp_server, unused_tcp_port, tmp_path, waha, sink, http, listener, BrokenListener())
    url = waha.add_file(MEDIA / "photo.jpg")
    with caplog.at_level(logging.WARNING, logger="gateway.plugins"):
        assert (await gw.post_waha(waha_payload(url, message_id="notify-1"))).status == 200
        [delivery] = await sink.wait_for(1, timeout=10)
        for _ in range(100):  # message_forwarded runs once the delivery is recorded as done
            if len(caplog.records) >= 2:
                break
            await asyncio.sleep(0.05)
    assert delivery.json["gateway"]["notes"] == []
    media_id = delivery.json["payload"]["media"]["gateway"]["id"]
    assert listener.stored == [media_id]  # the other listener still ran
    assert await gw.count("media", "id = ?", [media_id]) == 1
    assert len(gw.object_files()) == 1
    assert await gw.count("jobs", "kind = 'deliver' AND state = 'done'") == 1
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "gateway.plugins")
    assert lines == [
        "plugin BrokenListener: media_stored hook failed (ignored, the operation stands): "
        "RuntimeError: listener down",
        "plugin BrokenListener: message_forwarded hook failed (ignored, the operation stands): "
        "RuntimeError: listener down too",
    ]
    assert all(r.exc_info is None for r in caplog.records)


async def test_notify_lets_cancellation_through():
    class Slow:
        @hookimpl
        async def media_deleted(self, record: dict[str, Any]) -> None:
            await asyncio.sleep(10)

    task = asyncio.create_task(notify(make_manager(load_entrypoints=False, extra=[Slow()]),
                                      "media_deleted", record={"id": "m_1"}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class OtherWaha:
    """A second plugin offering a provider named ``waha``."""

    @hookimpl
    def register_providers(self, settings: Settings) -> list[Any]:
        return [type("P", (), {"name": "waha"})()]


class OtherLocal:
    """A second plugin offering a storage backend named ``local``."""

    @hookimpl
    def register_storage(self, settings: Settings) -> list[Any]:
        return [type("S", (), {"name": "local"})()]


def test_two_plugins_offering_one_name_fail_naming_both(tmp_path):
    data = deep_merge(base_config(tmp_path, 1, None, None), {"providers": {"waha": {}}})
    settings = Settings(config_dir=tmp_path, **data)
    with pytest.raises(ConfigError) as info:
        select_providers(settings, make_manager(extra=[OtherWaha()]))
    assert str(info.value) == "providers.waha: offered by two plugins, OtherWaha and whatsapp_waha"
    with pytest.raises(ConfigError) as info:
        select_storage(settings, make_manager(extra=[OtherLocal()]))
    assert str(info.value) == "storage.local: offered by two plugins, OtherLocal and storage_local"
    with pytest.raises(ConfigError, match="^storage.local: offered by two plugins"):
        create_app(settings, make_manager(extra=[OtherLocal()]))
