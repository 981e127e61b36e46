"""Read API bench: p50/p99 of /v1/stats, /v1/sources and /v1/events over 30 days in chdb.

N synthetic events (deterministic: a function of the row number) go into a fresh embedded
store through the real schema and its materialized views; the sink's SQL endpoint serves it,
and each endpoint's answer function runs against it as the gateway's does (SQL, loopback HTTP,
parsing), without the key check and the answer cache. `python -m bench.read_api N [RUNS]`
runs it.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.table import Row
from gateway.read_api import ANSWERS, Params
from gateway.read_store import EndpointReader
from ingest.settings import Settings
from sinks.clickhouse import EmbeddedClickHouse
from sinks.migrate import migrate
from sinks.sql_endpoint import serve

DAYS = 30
CHUNK = 500_000
RUNS = 40
# One row per number: 10 events a session, 4 sessions a visitor, one visitor in 5 identified.
GENERATE = """
INSERT INTO events (project, event_id, type, event, timestamp, received_at, anonymous_id,
    user_id, session_id, url, path, properties, source, medium, channel)
SELECT
    'bench', concat('e', toString(number)), 'track',
    ['page', 'page', 'page', 'click', 'signup'][number % 5 + 1],
    toDateTime({start}, 'UTC') + intDiv(number * {seconds}, {total}) AS ts, ts,
    concat('v', toString(intDiv(number, 40))),
    if(intDiv(number, 40) % 5 = 0, concat('u', toString(intDiv(number, 40))), ''),
    concat('s', toString(intDiv(number, 10))),
    'https://shop.example/', '/', '{{}}',
    ['google', 'facebook', 'facebook', '', 'newsletter'][intDiv(number, 10) % 5 + 1],
    ['organic', 'cpc', 'social', '', 'email'][intDiv(number, 10) % 5 + 1],
    ['Organic Search', 'Paid Social', 'Organic Social', 'Direct', 'Email'][
        intDiv(number, 10) % 5 + 1]
FROM numbers({offset}, {count})
"""


def load(ch: EmbeddedClickHouse, total: int, start: datetime) -> None:
    """Insert `total` events spread evenly over DAYS days from `start`."""
    for offset in range(0, total, CHUNK):
        ch.execute(
            GENERATE.format(
                start=f"'{start:%Y-%m-%d %H:%M:%S}'",
                seconds=DAYS * 86400,
                total=total,
                offset=offset,
                count=min(CHUNK, total - offset),
            )
        )


async def measure(data_dir: Path, start: datetime, runs: int) -> dict[str, list[float]]:
    """`runs` timings (ms) of each endpoint over the whole range."""
    settings = Settings(data_dir=data_dir, read_max_range_days=DAYS + 1)
    reader = EndpointReader(data_dir, timeout_s=120)
    last_day = (start + timedelta(days=DAYS - 1)).date()  # a date `to` includes its day
    span = {"from": start.date().isoformat(), "to": last_day.isoformat()}
    queries = {
        "stats": span,
        "stats_hourly": span | {"interval": "hour"},
        "sources": span | {"conversion_event": "signup"},
        "events": span | {"limit": "100"},
    }
    timings: dict[str, list[float]] = {name: [] for name in queries}
    counted = 0
    try:
        for _ in range(runs):
            for name, query in queries.items():
                route = name.removesuffix("_hourly")
                began = time.perf_counter()
                answer = await ANSWERS[route](reader, "bench", Params(route, query, settings))
                timings[name].append((time.perf_counter() - began) * 1000)
                if name == "stats":
                    counted = sum(b["events"] for b in answer["buckets"])
    finally:
        await reader.close()
    print(f"/v1/stats counts {counted} events over the range", file=sys.stderr)
    return timings


async def run_async(total: int, root: Path, runs: int) -> list[Row]:
    """Load, serve, measure; rows for the bench table."""
    ch = EmbeddedClickHouse(root / "clickhouse")
    migrate(ch)
    start = (datetime.now(UTC) - timedelta(days=DAYS)).replace(
        hour=0, minute=0, second=0, microsecond=0, tzinfo=None
    )
    began = time.perf_counter()
    await asyncio.to_thread(load, ch, total, start)
    print(f"loaded {total} events in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(ch, root, stop))
    while not (root / "clickhouse.endpoint").exists():
        await asyncio.sleep(0.05)
    try:
        timings = await measure(root, start, runs)
    finally:
        stop.set()
        await server
        ch.close()
    rows = []
    for name, values in timings.items():
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        target = "≤ 200 ms" if name in ("stats", "sources") else ""
        rows.append(Row("read api", f"{name} p50", statistics.median(values), None, target, "ms"))
        rows.append(Row("read api", f"{name} p99", p99, None, target, "ms"))
    return rows


def run(total: int, runs: int = RUNS) -> list[Row]:
    """The bench in a temporary data directory: `total` events, `runs` calls of each endpoint."""
    root = Path(tempfile.mkdtemp(prefix="mm-bench-read-"))
    try:
        return asyncio.run(run_async(total, root, runs))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    from bench.table import markdown

    total = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(markdown(run(total, int(sys.argv[2]) if len(sys.argv) > 2 else RUNS)))
