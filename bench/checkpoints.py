"""Which of the SQLite catalog's commits run a WAL checkpoint, and what it costs them (issue 12, B7's
tail): the catalog alone, in a child process, at B7's rhythm (50 messages/s; each a webhook's commit
with its claimed ingest job, about 4 ms later the ingest's completion with its media row and its
claimed deliver job; both durable), for ``--seconds`` (default 20).

A commit ran a checkpoint, or waited behind one, when the count of WAL frames copied into the
database file (``nBackfill``, at offset 96 of the ``-shm`` wal-index: https://www.sqlite.org/walformat.html)
moved while it was awaited. For the webhook's and the completion's commits it prints how many of
them that was, the median latency of those against the median of the others in the same run (the
baseline), p50/p99/max of all, the idle-time checkpoints the catalog thread made, and the load
average. ``--baseline DIR`` runs another source tree's catalog too (for instance ``git archive``
of a commit before the idle-time checkpoint), alternating with this one in ``--rounds`` (default 3).

From the repository root::

    .venv/bin/python -m bench.checkpoints
    .venv/bin/python -m bench.checkpoints --baseline /tmp/before --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RATE = 50.0


async def _measure(seconds: float) -> dict[str, Any]:
    """In the child: the catalog of the tree first on ``sys.path``, under B7's rhythm."""
    from gateway.catalog import SQLiteCatalog
    from tests.test_catalog_contract import _event, _media

    with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
        catalog = SQLiteCatalog(Path(tmp) / "gateway.db")
        await catalog.open()
        body = json.dumps({"payload": {"body": "x" * 1500}}).encode()  # about B7's webhook
        await catalog.record_webhook("waha", body, [_event("warm-up")])
        with open(f"{catalog.path}-shm", "rb") as shm, mmap.mmap(shm.fileno(), 0, access=mmap.ACCESS_READ) as index:
            def backfilled() -> int:
                return int(struct.unpack_from("=I", index, 96)[0])

            times: dict[str, list[tuple[float, bool]]] = {"webhook": [], "completion": []}

            async def timed(name: str, write: Any) -> Any:
                before, start = backfilled(), time.perf_counter()
                result = await write
                times[name].append(((time.perf_counter() - start) * 1e3, backfilled() != before))
                return result

            async def message(n: int) -> None:
                [event_id], _, [job] = await timed("webhook", catalog.record_webhook(
                    "waha", body, [_event(f"m{n}")], claim={"ingest"}))
                await asyncio.sleep(0.004)  # the download
                await timed("completion", catalog.complete_job(
                    job["id"], [("deliver", f"deliver:{event_id}:bot", {"event_id": event_id})], claim=True,
                    media=[_media(n + 1)]))

            tasks, start = [], time.perf_counter()
            for n in range(int(seconds * RATE)):
                await asyncio.sleep(max(0.0, start + n / RATE - time.perf_counter()))
                tasks.append(asyncio.create_task(message(n)))
            await asyncio.gather(*tasks)
            result = {"times": times, "idle_checkpoints": getattr(catalog, "checkpoints", None)}
            # closed before the -shm: closing a descriptor of it drops this process's POSIX locks
            # on it, the catalog's own included (fcntl(2))
            await catalog.close()
    return result


def _run(code: Path, seconds: float) -> dict[str, Any]:
    """One child run on source tree ``code``; its result and the load average after it."""
    out = subprocess.run([sys.executable, __file__, "--child", str(code), "--seconds", str(seconds)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    result["load"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return result


def _report(label: str, result: dict[str, Any]) -> None:
    from bench.harness import percentile  # not in the child, which imports another tree's code

    for name, rows in result["times"].items():
        all_ms = [ms for ms, _ in rows]
        ran = [ms for ms, checkpoint in rows if checkpoint]
        others = [ms for ms, checkpoint in rows if not checkpoint]
        ran_median = f"{statistics.median(ran):.2f}" if ran else "-"
        print(f"{label:9} {name:10} {len(ran):3} of {len(rows)} commits ran or waited behind a checkpoint: "
              f"median {ran_median} ms against {statistics.median(others):.2f} ms for the others; all: p50 "
              f"{percentile(all_ms, .5):.2f}, p99 {percentile(all_ms, .99):.2f}, max {max(all_ms):.1f} ms")
    idle = result["idle_checkpoints"]
    print(f"{label:9} idle-time checkpoints: {'none (not in this tree)' if idle is None else idle}; "
          f"load average after {result['load']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per run (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating (default 3)")
    parser.add_argument("--baseline", type=Path, help="another source tree to run alternately")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.path.insert(0, str(args.child.resolve()))
        print(json.dumps(asyncio.run(_measure(args.seconds))))
        return
    (REPO / "var").mkdir(exist_ok=True)
    print(f"{RATE:.0f} messages/s for {args.seconds:.0f} s per run; load average before "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for round_ in range(1, args.rounds + 1):
        _report(f"this #{round_}", _run(REPO, args.seconds))
        if args.baseline is not None:
            _report(f"base #{round_}", _run(args.baseline.resolve(), args.seconds))


if __name__ == "__main__":
    main()
