"""The processor's baseline: plain aiokafka consume -> the same Enricher.enrich -> produce.

No Faust, no consumer group: it reads every raw partition from the start and publishes to its
own topic, awaiting each fetched batch's acks before the next fetch (what Faust's
flush-before-commit also guarantees). With `envelopes` it reads envelopes and writes one per
partition per fetched batch, as the processor does per step.
Run: `python -m bench.bare_processor BOOTSTRAP OUT GEO (envelopes|single)`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.partitioner import partition_for
from ingest.records import encode, envelopes, event_key, raw_records
from ingest.topics import topic
from processors.classify import Classifier
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.useragent import UserAgentParser


async def main(bootstrap: str, out: str, geo: Path | None, grouped: bool) -> None:
    """Enrich until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    enricher = Enricher(b"bench-salt", 30, Classifier(), UserAgentParser(), CountryLookup(geo))
    raw = topic("raw")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=2,
        max_request_size=4 << 20,
        max_batch_size=512 * 1024,
    )
    await consumer.start()
    await producer.start()
    consumer.assign([TopicPartition(raw.name, p) for p in range(raw.partitions)])
    partitions = topic("enriched").partitions
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=50, max_records=1000)
            if not grouped:
                futures = [
                    await producer.send(
                        out, encode(enricher.enrich(raw_records(m.value)[0])), key=m.key
                    )
                    for messages in fetched.values()
                    for m in messages
                ]
                await asyncio.gather(*futures)
                continue
            records = [
                (event_key(event), encode(enricher.enrich(event)))  # type: ignore[arg-type]
                for messages in fetched.values()
                for m in messages
                for event in raw_records(m.value)
            ]
            packed = envelopes(records, lambda key: partition_for(key, partitions), 1_000_000)
            futures = [
                await producer.send(out, e.value, key=e.key, partition=e.partition) for e in packed
            ]
            await asyncio.gather(*futures)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "envelopes"))
