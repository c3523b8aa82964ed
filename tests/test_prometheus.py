"""Metrics as Prometheus sees them: ``promtool`` (Debian's ``prometheus`` package, installed by
scripts/system-deps) checks the /metrics output and ops/prometheus/, and a real Prometheus on
127.0.0.1 scrapes a real daemon while a webhook goes through it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.keys import RETENTION
from tests.conftest import MANIFEST, MEDIA, REPO, base_config, deep_merge, waha_payload
from tests.daemon import GatewayProcess, write_toml

OPS = REPO / "ops" / "prometheus"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
if not (PROMTOOL and PROMETHEUS):
    message = "promtool/prometheus not installed: run scripts/system-deps (Debian package prometheus)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)  # CI installs them: never skip there
    pytest.skip(message, allow_module_level=True)

# Every metric the README's Metrics table documents, by the name one queries.
DOCUMENTED = {
    "gateway_build_info", "gateway_replica_info", "gateway_http_requests_total",
    "gateway_http_request_duration_seconds",
    "gateway_webhooks_received_total", "gateway_media_ingested_total", "gateway_media_ingested_bytes_total",
    "gateway_media_ingest_duration_seconds", "gateway_media_fetch_failures_total",
    "gateway_storage_operations_total", "gateway_storage_operation_duration_seconds", "gateway_stored_objects",
    "gateway_stored_bytes", "gateway_storage_free_bytes", "gateway_media_missing_objects", "gateway_jobs",
    "gateway_jobs_oldest_queued_age_seconds", "gateway_media_backlog_oldest_seconds",
    "gateway_media_backlog_deadline_ratio", "gateway_media_store_estimate_seconds", "gateway_media_admission_holding",
    "gateway_catalog_commits_total", "gateway_catalog_durable_commits_total", "gateway_catalog_batch_size",
    "gateway_jobs_processed_total", "gateway_job_duration_seconds",
    "gateway_deliveries_total", "gateway_outbound_sends_total", "gateway_relay_fallbacks_total",
    "gateway_cleanup_runs_total",
    "gateway_cleanup_deleted_objects_total", "gateway_cleanup_deleted_bytes_total",
    "gateway_cleanup_delete_failures_total", "gateway_cleanup_aborted_uploads_total",
    "gateway_cleanup_pruned_rows_total",
    "gateway_cleanup_duration_seconds", "gateway_cleanup_in_progress",
    "gateway_cleanup_last_success_timestamp_seconds",
}


async def _run(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(stdin)
    return proc.returncode, out.decode()


async def test_promtool_accepts_the_metrics_output(start_gateway, waha, sink, http):
    gw = await start_gateway(api={"keys": [{"name": "ops", "key": "k", "scopes": ["admin"]}]})
    url = waha.add_file(MEDIA / "photo.jpg")
    assert (await gw.post_waha(waha_payload(url, message_id="prom-1"))).status == 200
    [d] = await sink.wait_for(1)
    async with http.get(d.json["payload"]["media"]["url"]) as r:
        assert r.status == 200
    async with http.get(f"{gw.url}/readyz") as r:
        assert r.status == 200
    async with http.post(f"{gw.url}/api/v1/admin/cleanup", headers={"Authorization": "Bearer k"}) as r:
        assert r.status == 200
    async with http.request("PROPFIND", f"{gw.url}/healthz") as r:  # WebDAV: no label of its own
        assert r.status == 405
    async with http.get(f"{gw.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()

    code, out = await _run(PROMTOOL, "check", "metrics", stdin=text.encode())
    assert code == 0 and out.strip() == "", out
    families = {(name, kind) for _, _, name, kind in (line.split() for line in text.splitlines()
                                                      if line.startswith("# TYPE gateway_"))}
    # counters are queried with _total, whichever way the client library names the family
    assert {n if k != "counter" or n.endswith("_total") else n + "_total" for n, k in families} == DOCUMENTED
    assert 'method="OTHER"' in text and "PROPFIND" not in text
    assert 'gateway_build_info{version="' in text and "process_start_time_seconds" in text
    assert 'gateway_jobs_oldest_queued_age_seconds{kind="ingest"} 0.0' in text
    assert 'gateway_storage_operations_total{backend="local",operation="put",outcome="ok"} 1.0' in text
    assert 'gateway_storage_operation_duration_seconds_count{backend="local",operation="list"} 1.0' in text
    last = float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("gateway_cleanup_last_success_timestamp_seconds ")))
    assert abs(last - time.time()) < 60
    assert gw.app[RETENTION].running is False


async def test_promtool_accepts_the_example_config_and_alert_rules():
    for args in (("check", "rules", str(OPS / "alerts.yml")), ("check", "config", str(OPS / "prometheus.yml")),
                 ("test", "rules", str(OPS / "alerts_test.yml"))):
        code, out = await _run(PROMTOOL, *args)
        assert code == 0 and "SUCCESS" in out, out


async def _query(http: aiohttp.ClientSession, base: str, promql: str) -> list[dict]:
    async with http.get(f"{base}/api/v1/query", params={"query": promql}) as r:
        body = await r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def _until(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"Prometheus: {what} not seen within {timeout:.0f}s"
        await asyncio.sleep(0.2)


async def test_a_real_prometheus_sees_media_ingested(tmp_path: Path, waha, sink, unused_tcp_port_factory):
    gw_port, prom_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    config = deep_merge(base_config(tmp_path, gw_port, waha, sink), {"log": {"format": "auto", "level": "INFO"}})
    daemon = GatewayProcess(write_toml(tmp_path / "gateway.toml", config), gw_port, tmp_path / "daemon.log")
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(OPS / "alerts.yml")],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [f"127.0.0.1:{gw_port}"]}]}],
    }))
    base = f"http://127.0.0.1:{prom_port}"
    prometheus = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    try:
        await daemon.start()  # while Prometheus starts (it loads scrape targets only every 5 s)
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                try:
                    async with http.get(f"{base}/-/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            async def scraped() -> bool:
                return any(s["value"][1] == "1" for s in await _query(http, base, 'up{job="gateway"}'))

            async def ingested() -> float:
                result = await _query(http, base, 'sum(gateway_media_ingested_total{outcome="stored"})')
                return float(result[0]["value"][1]) if result else 0.0

            await _until(ready, 30, "ready")
            await _until(scraped, 30, "a successful scrape")
            before = await ingested()
            url = waha.add_file(MEDIA / "photo.jpg")
            async with http.post(f"{daemon.url}/webhooks/waha", data=json.dumps(
                    waha_payload(url, message_id="prom-real-1"))) as r:
                assert r.status == 200
            await sink.wait_for(1)
            after = await _until(lambda: _rose(ingested, before), 30, "gateway_media_ingested_total rising")
            assert after == before + 1
            async with http.get(f"{base}/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            assert {rule["name"] for g in groups for rule in g["rules"]} >= {
                "GatewayDeadJobs", "GatewayCleanupNotRun", "GatewayIngestFailures"}
    finally:
        prometheus.terminate()
        await prometheus.wait()
        if daemon.proc is not None:
            assert await daemon.terminate() == 0

    # the daemon's log (stderr is a file, so JSON lines) carries the event, provider and media ids
    records = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    stored = [r for r in records if r.get("logger") == "gateway.store" and r.get("media_id")]
    assert stored and all(r["event_id"].startswith("ev_") and r["provider"] == "waha" for r in stored)
    assert stored[0]["message"].startswith("stored m_") and str(MANIFEST["photo.jpg"]["size"]) in stored[0]["message"]


async def _rose(probe, before: float) -> float | None:
    value = await probe()
    return value if value > before else None
