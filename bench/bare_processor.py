"""The processor's baseline: plain aiokafka consume -> the same Enricher.enrich -> produce.

No Faust, no consumer group: it reads every raw partition from the start and publishes to its
own topic, awaiting each fetched batch's acks before the next fetch (what Faust's
flush-before-commit also guarantees). Run: `python -m bench.bare_processor BOOTSTRAP OUT [GEO]`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.records import decode, encode
from ingest.topics import topic
from processors.classify import Classifier
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.useragent import UserAgentParser


async def main(bootstrap: str, out: str, geo: Path | None) -> None:
    """Enrich until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    enricher = Enricher(b"bench-salt", 30, Classifier(), UserAgentParser(), CountryLookup(geo))
    raw = topic("raw")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=2
    )
    await consumer.start()
    await producer.start()
    consumer.assign([TopicPartition(raw.name, p) for p in range(raw.partitions)])
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=50, max_records=1000)
            futures = [
                await producer.send(out, encode(enricher.enrich(decode(m.value))), key=m.key)
                for messages in fetched.values()
                for m in messages
            ]
            await asyncio.gather(*futures)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else None))
