"""Sink bench: rows/s into ClickHouse (chdb, and Debian's server when installed).

Once per design: the enriched topic is filled first with N events (single records, or one
envelope per partition per ENRICHED_PER_STEP events, as processor steps emit them); then a sink
starts and the bench polls count() until it reaches N (chdb through the sink's SQL endpoint,
the server directly). The rate counts only rows that landed after the first insert was seen.
The baseline (bench.bare_insert) inserts the same rows with the same batch size straight into a
fresh store, without Kafka; it also times one-row-per-insert.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from bench import REPO_ROOT
from bench.events import grouped, raw_events
from bench.services import (
    CLICKHOUSE_SERVER_BIN,
    ClickHouseServer,
    sink_sql,
    stage,
    stage_env,
    steady_rate,
    write_geo_db,
)
from bench.table import Row
from ingest.records import encode, record_key
from ingest.settings import Settings
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import EmbeddedBroker

SINGLE_ROWS = 300
# Events per processor step, whose enriched events go out as one envelope per partition.
ENRICHED_PER_STEP = 6000


def enriched_rows(path: Path, count: int, geo: Path) -> list[tuple[bytes, bytes]]:
    """`count` enriched records as (key, value), also written to `path` as JSON lines."""
    from processors.classify import Classifier
    from processors.enrich import Enricher
    from processors.geo import CountryLookup
    from processors.useragent import UserAgentParser

    enricher = Enricher(b"bench-salt", 30, Classifier(), UserAgentParser(), CountryLookup(geo))
    out = []
    for r in raw_events(count, int(time.time() * 1000)):
        out.append((record_key(r["project"], r["anonymous_id"], ""), encode(enricher.enrich(r))))
    path.write_bytes(b"\n".join(v for _, v in out) + b"\n")
    return out


def _server_count(url: str) -> Callable[[], int]:
    from clickhouse_driver import Client

    database = url.rsplit("/", 1)[1]
    client = Client(host="127.0.0.1", port=int(url.split(":")[3].split("/")[0]))

    def count() -> int:
        with suppress(Exception):  # the table does not exist until the sink migrated
            return int(client.execute(f"SELECT count() FROM {database}.events")[0][0])
        return 0

    return count


def timed_sink(
    root: Path, records: list[tuple[bytes, bytes]], url: str | None, envelopes: bool = False
) -> tuple[float, float]:
    """A sink on a fresh broker holding `records` (as envelopes, or one per record); return
    (rows/s, peak RSS MB)."""
    from bench.services import produce

    data_dir = root / f"sink-{uuid.uuid4().hex[:6]}"
    broker = EmbeddedBroker().start()
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        values = grouped(records, ENRICHED_PER_STEP) if envelopes else records
        asyncio.run(produce(broker.bootstrap, topic("enriched").name, values))
        extra = {"MILLIMETRIC_CLICKHOUSE_URL": url} if url else {}
        sink = stage("sink", stage_env(broker.bootstrap, data_dir, **extra), root).start()
        if url:
            counter = _server_count(url)
        else:

            def counter() -> int:
                return int(sink_sql(data_dir, "SELECT count() FROM events") or 0)

        async def current() -> int:
            return await asyncio.to_thread(counter)

        try:
            rate, _ = asyncio.run(steady_rate(current, len(records), 120 + len(records) / 2000))
            return rate, sink.peak_rss_mb()
        finally:
            sink.stop()
    finally:
        broker.stop()


def bare(rows_file: Path, kind: str, target: str) -> dict[str, float]:
    """bench.bare_insert as its own process."""
    batch = Settings().sink_batch_rows
    args = [str(rows_file), str(batch), str(SINGLE_ROWS), kind, target]
    out = subprocess.run(
        [sys.executable, "-m", "bench.bare_insert", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(root: Path, count: int, server: bool = True) -> tuple[list[Row], float]:
    """The sink's rows, and its chdb rows/s (for the end-to-end baseline)."""
    root.mkdir(parents=True, exist_ok=True)
    rows_file = root / "enriched.jsonl"
    records = enriched_rows(rows_file, count, write_geo_db(root / "bench-country.mmdb"))
    batch = Settings().sink_batch_rows
    single, _ = timed_sink(root, records, None)
    rate, rss = timed_sink(root, records, None, envelopes=True)
    base = bare(rows_file, "chdb", str(root / "bare-chdb"))
    label = f"({count:,} rows, batches ≤ {batch:,})"
    rows = [
        Row("sink", f"chdb rows/s {label}, envelopes", rate, base["rows_per_s"], "≥ 0.8x",
            "rows/s"),
        Row("sink", f"chdb rows/s {label}, single records", single, base["rows_per_s"],
            "≥ 0.8x", "rows/s"),
        Row("sink", "chdb rows/s: envelopes vs single records", rate, single, "-", "rows/s"),
        Row("sink", "chdb rows/s vs one row per insert", rate, base["one_row_per_s"], "-",
            "rows/s"),
        Row("sink", "peak RSS (VmHWM), chdb", rss, base["peak_rss_mb"],
            f"bounded by {batch:,}-row batches", "MB"),
    ]  # fmt: skip
    if server and CLICKHOUSE_SERVER_BIN.exists():
        ch = ClickHouseServer(root / "clickhouse-server").start()
        try:
            ssingle, _ = timed_sink(root, records, ch.url("bench_sink_single"))
            srate, srss = timed_sink(root, records, ch.url("bench_sink"), envelopes=True)
            sbase = bare(rows_file, "server", ch.url("bench_bare"))
        finally:
            ch.stop()
        rows += [
            Row("sink", f"server 18.16 rows/s {label}, envelopes", srate, sbase["rows_per_s"],
                "≥ 0.8x", "rows/s"),
            Row("sink", f"server 18.16 rows/s {label}, single records", ssingle,
                sbase["rows_per_s"], "≥ 0.8x", "rows/s"),
            Row("sink", "server rows/s: envelopes vs single records", srate, ssingle, "-",
                "rows/s"),
            Row("sink", "server rows/s vs one row per insert", srate, sbase["one_row_per_s"],
                "-", "rows/s"),
            Row("sink", "peak RSS (VmHWM), server", srss, sbase["peak_rss_mb"],
                f"bounded by {batch:,}-row batches", "MB"),
        ]  # fmt: skip
    return rows, rate
