"""Processor bench: events/s of one Faust worker with every enrichment on, against a plain loop.

The raw topic is filled first with N records shaped as the gateway publishes them; then the
worker starts and the bench watches the enriched topic's high watermarks until N records are
there. The rate counts only the records done after the first progress was seen (start-up and
the group join excluded). The baseline (bench.bare_processor) does the same enrichment from the
same topic into its own, timed the same way. Geo uses a small country database over the bench's
IP ranges (bench.services.write_geo_db).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.events import raw_events
from bench.services import Proc, TopicCount, produce, stage, stage_env, steady_rate, write_geo_db
from bench.table import Row
from ingest.dev import EmbeddedBroker
from ingest.records import encode, record_key
from ingest.topics import ensure_topics, topic

BARE_TOPIC = "bench.enriched-bare"


async def _fill(bootstrap: str, count: int) -> None:
    await ensure_topics(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(BARE_TOPIC, topic("enriched").partitions, 1)])
    finally:
        await admin.close()
    records = [
        (record_key(r["project"], r["anonymous_id"], r["event_id"]), encode(r))
        for r in raw_events(count, int(time.time() * 1000))
    ]
    await produce(bootstrap, topic("raw").name, records)


async def _watch(bootstrap: str, name: str, count: int, timeout: float) -> float:
    async with TopicCount(bootstrap, name, topic("enriched").partitions) as counter:
        rate, _ = await steady_rate(counter.count, count, timeout)
    return rate


def timed(proc: Proc, bootstrap: str, name: str, count: int) -> tuple[float, float]:
    """Start `proc`, wait for `count` records on `name`; return (events/s, peak RSS MB)."""
    proc.start()
    try:
        rate = asyncio.run(_watch(bootstrap, name, count, timeout=60 + count / 500))
        return rate, proc.peak_rss_mb()
    finally:
        proc.stop()


def run(root: Path, count: int) -> tuple[list[Row], float]:
    """The processor's rows, and its events/s (for the end-to-end baseline)."""
    root.mkdir(parents=True, exist_ok=True)
    geo = write_geo_db(root / "bench-country.mmdb")
    broker = EmbeddedBroker().start()
    try:
        asyncio.run(_fill(broker.bootstrap, count))
        env = stage_env(broker.bootstrap, root / "data", MILLIMETRIC_GEOIP_PATH=str(geo))
        real, rss = timed(stage("processor", env, root), broker.bootstrap, topic("enriched").name,
                          count)  # fmt: skip
        bare_args = ["-m", "bench.bare_processor", broker.bootstrap, BARE_TOPIC, str(geo)]
        bare = Proc(bare_args, env, root / "bare_processor.log")
        base, base_rss = timed(bare, broker.bootstrap, BARE_TOPIC, count)
    finally:
        broker.stop()
    rows = [
        Row("processor", f"events/s, 1 worker, all enrichments ({count:,} events)", real, base,
            "≥ 0.5x", "events/s"),
        Row("processor", "peak RSS (VmHWM)", rss, base_rss, "≤ 300 MB", "MB"),
    ]  # fmt: skip
    return rows, real
