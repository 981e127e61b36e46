"""Processor bench: events/s of one Faust worker with every enrichment on, against a plain loop.

Once per design (single-event records, envelopes): the raw topic is filled first with N events
shaped as the gateway publishes them (as envelopes: grouped per /v1/batch of 500); then the
worker starts and the bench watches the enriched topic until N events are there (single
records: its high watermarks; envelopes: their counts). The rate counts only the events done
after the first progress was seen (start-up and the group join excluded). The baseline
(bench.bare_processor) does the same enrichment from the same records into its own topic,
timed the same way. Geo uses a small country database over the bench's IP ranges
(bench.services.write_geo_db).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.events import DESIGNS, grouped, raw_events
from bench.gateway import BATCH
from bench.services import (
    EventCount,
    Proc,
    TopicCount,
    cpu_seconds,
    produce,
    stage,
    stage_env,
    steady_rate,
    write_geo_db,
)
from bench.table import Row
from ingest.records import encode, record_key
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import EmbeddedBroker

BARE_TOPIC = "bench.enriched-bare"


async def _fill(bootstrap: str, count: int, envelopes: bool) -> None:
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
    await produce(bootstrap, topic("raw").name, grouped(records, BATCH) if envelopes else records)


async def _watch(
    pid: int, bootstrap: str, name: str, count: int, timeout: float, envelopes: bool
) -> tuple[float, float]:
    counting = EventCount if envelopes else TopicCount
    # (events, CPU seconds) at the first progress seen and at the last poll: the same window
    # as the rate, so start-up and the group join cost no CPU per event either.
    window: list[tuple[int, float]] = []

    async with counting(bootstrap, name, topic("enriched").partitions) as counter:

        async def current() -> int:
            done = await counter.count()
            if done:
                sample = (done, cpu_seconds(pid))
                if not window:
                    window.append(sample)
                window[1:] = [sample]
            return done

        rate, _ = await steady_rate(current, count, timeout)
    (first, first_cpu), (last, last_cpu) = window
    return rate, (last_cpu - first_cpu) / (last - first) * 1e6 if last > first else float("nan")


def timed(
    proc: Proc, bootstrap: str, name: str, count: int, envelopes: bool
) -> tuple[float, float, float]:
    """Start `proc`, wait for `count` events on `name`; return (events/s, CPU µs per event,
    peak RSS MB)."""
    proc.start()
    try:
        rate, cpu = asyncio.run(
            _watch(proc.pid, bootstrap, name, count, 60 + count / 500, envelopes)
        )
        return rate, cpu, proc.peak_rss_mb()
    finally:
        proc.stop()


def design(root: Path, count: int, name: str) -> tuple[list[Row], float]:
    """One design's rows (processor and plain loop over the same records) and events/s."""
    envelopes = DESIGNS[name] == "true"
    root.mkdir(parents=True, exist_ok=True)
    geo = write_geo_db(root / "bench-country.mmdb")
    broker = EmbeddedBroker().start()
    try:
        asyncio.run(_fill(broker.bootstrap, count, envelopes))
        env = stage_env(broker.bootstrap, root / "data", MILLIMETRIC_GEOIP_PATH=str(geo),
                        MILLIMETRIC_ENVELOPES=DESIGNS[name])  # fmt: skip
        worker = stage("processor", env, root)
        real, cpu, rss = timed(worker, broker.bootstrap, topic("enriched").name, count, envelopes)
        bare_args = ["-m", "bench.bare_processor", broker.bootstrap, BARE_TOPIC, str(geo),
                     "envelopes" if envelopes else "single"]  # fmt: skip
        bare = Proc(bare_args, env, root / "bare_processor.log")
        base, base_cpu, base_rss = timed(bare, broker.bootstrap, BARE_TOPIC, count, envelopes)
    finally:
        broker.stop()
    target = "≥ 0.8x" if envelopes else "≥ 0.5x"
    rows = [
        Row("processor", f"events/s, 1 worker, all enrichments ({count:,} events), {name}",
            real, base, target, "events/s"),
        Row("processor", f"CPU per event, {name}", cpu, base_cpu, "-", "µs"),
        Row("processor", f"peak RSS (VmHWM), {name}", rss, base_rss, "≤ 300 MB", "MB"),
    ]  # fmt: skip
    return rows, real


def run(root: Path, count: int) -> tuple[list[Row], float]:
    """The processor's rows for both designs and their ratio, and its events/s with envelopes
    (for the end-to-end baseline)."""
    single_rows, single = design(root / "single", count, "single records")
    rows, real = design(root / "envelopes", count, "envelopes")
    ratio = Row("processor", "events/s: envelopes vs single records", real, single, "-",
                "events/s")  # fmt: skip
    return [*single_rows, *rows, ratio], real
