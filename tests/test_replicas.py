"""Three gateway replicas on one PostgreSQL catalog and one SeaweedFS bucket, as real processes
(DESIGN §6, scale-out): webhooks spread across them are each stored once and forwarded; a replica
SIGKILLed mid-load loses nothing: its running jobs are taken over by the others once their lease
runs out, and no object is stored twice; ``/events`` notices reach the clients of every replica.
The scheduled cleanup running once across replicas is in test_retention_replicas below."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from gateway.catalog.postgres import PostgresCatalog
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.retention import Retention
from tests.conftest import MANIFEST, MEDIA, boto3_client, s3_config, waha_payload
from tests.replicas import ReplicaSet

LEASE = 2.0
ADMIN = "admin-key"


async def test_three_replicas_one_killed_mid_load_lose_nothing(tmp_path, waha, sink, s3_server, postgres_server,
                                                               unused_tcp_port_factory):
    storage = {"backend": "s3", "s3": s3_config(s3_server)}
    bucket = storage["s3"]["bucket"]
    replicas = ReplicaSet(tmp_path, [unused_tcp_port_factory() for _ in range(3)],
                          postgres_server.create_database(), storage, waha, sink,
                          queue={"lease": LEASE, "workers": 4}, log={"level": "INFO"},
                          api={"keys": [{"name": "admin", "key": ADMIN, "scopes": ["admin"]}]},
                          retention={"enabled": False})
    victim, watched, other = replicas.procs
    names = sorted(MANIFEST)
    messages = [(f"msg-{i}", names[i % len(names)]) for i in range(30)]
    waha.delay = 0.3  # downloads in flight when the victim dies
    await replicas.start()
    try:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"{watched.url}/api/v1/events", headers={"Authorization": f"Bearer {ADMIN}"}) as ws:
            async def post(i: int, message_id: str, name: str) -> None:
                url = waha.add_file(MEDIA / name, name=f"{message_id}-{name}")
                body = json.dumps(waha_payload(url, message_id=message_id, filename=name))
                async with http.post(f"{replicas.procs[i % 3].url}/webhooks/waha", data=body) as r:
                    assert r.status == 200

            await asyncio.gather(*(post(i, m, n) for i, (m, n) in enumerate(messages)))
            deadline = time.monotonic() + 10
            while not (doomed := replicas.running_jobs_of(victim)):
                assert time.monotonic() < deadline, "the victim never ran a job"
                await asyncio.sleep(0.02)
            victim.kill()
            killed_at = time.monotonic()
            while any(state == "running" and f":{victim.pid}:" in owner
                      for state, owner in replicas.rows("SELECT state, owner FROM jobs WHERE id = ANY(%s)", doomed)):
                await asyncio.sleep(0.05)
            recovered = time.monotonic() - killed_at
            waha.delay = 0.0
            await sink.wait_for(len(messages), timeout=40)

            notices = []
            try:
                while True:
                    notices.append(await ws.receive_json(timeout=1.0))
            except (TimeoutError, asyncio.TimeoutError):
                pass
    finally:
        await replicas.stop()

    print(f"lease {LEASE:.0f} s: the killed replica's {len(doomed)} job(s) taken over after {recovered:.2f} s")
    # not before the lease runs out (renewed every third of it, so at least 2/3 of it is left), and promptly after
    assert LEASE * 2 / 3 - 0.1 <= recovered <= LEASE + 3.0
    forwarded = {d.json["payload"]["id"]: d.json["payload"]["media"] for d in sink.deliveries}
    assert set(forwarded) == {m for m, _ in messages}  # every message forwarded
    for message_id, name in messages:
        assert forwarded[message_id]["gateway"]["sha256"] == MANIFEST[name]["sha256_hex"]
    media = replicas.rows("SELECT source_key, key FROM media")
    assert len(media) == len(messages) and len({s for s, _ in media}) == len(messages)  # stored once each
    objects = boto3_client(s3_server.url).list_objects_v2(Bucket=bucket).get("Contents", [])
    assert sorted(o["Key"] for o in objects) == sorted(k for _, k in media)  # no duplicate, no orphan
    assert replicas.rows("SELECT COUNT(*) FROM jobs WHERE state != 'done'") == [(0,)]
    assert replicas.rows("SELECT COUNT(*) FROM events") == [(len(messages),)]

    # /events on one replica saw what the others stored (all but what the victim stored as it died)
    created = {n["file"]["id"] for n in notices if n["type"] == "created"}
    by_other = {r[0] for r in replicas.rows(
        "SELECT m.id FROM media m JOIN jobs j ON j.key = 'ingest:' || m.event_id WHERE j.owner LIKE %s",
        f"%:{other.pid}:%")}
    assert by_other and by_other <= created
    assert len(created) >= len(messages) - len(doomed)


async def test_retention_replicas_run_the_scheduled_cleanup_once(tmp_path, postgres_server):
    url = postgres_server.create_database()
    settings = Settings(config_dir=tmp_path, catalog={"url": url}, media={"link_secret": "k"},
                        storage={"backend": "local", "local": {"root": str(tmp_path / "media")}})
    from gateway.app import select_storage
    from gateway.plugins import make_manager
    catalogs = [PostgresCatalog(url) for _ in range(3)]
    storage = select_storage(settings, make_manager())
    await storage.start()
    for c in catalogs:
        await c.open()
    try:
        if time.time() % 60 > 55:  # one due minute for the whole test
            await asyncio.sleep(61 - time.time() % 60)
        runners = [Retention(settings, c, storage, Metrics()) for c in catalogs]
        await asyncio.gather(*(r._scheduled() for r in runners))  # every replica's cron fires
        await runners[0]._scheduled()  # a late replica of the same minute
        runs = await catalogs[0].cleanup_runs()
        assert [r["trigger"] for r in runs] == ["schedule"]
        await runners[1].spawn(trigger="api")  # a run by hand is not the schedule's: it runs
        assert len(await catalogs[0].cleanup_runs()) == 2
    finally:
        for c in catalogs:
            await c.close()
        await storage.close()
