"""The processor: a Faust worker that reads raw events, enriches them, and emits enriched events.

The agent takes events in batches (`stream.take_events`), so per event there is only the pure
enrichment. Faust acks a batch after it is handled and flushes its producer before committing
offsets, so an event is never committed before its enriched record is on the broker
(at-least-once; the sink deduplicates on event_id). Records that cannot be decoded go to the
dead-letter topic.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import faust

from ingest.records import decode, encode
from ingest.settings import Settings
from ingest.topics import require
from processors.classify import Classifier
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.useragent import UserAgentParser

log = logging.getLogger(__name__)


def build_app(settings: Settings, bootstrap: str) -> faust.App:
    """The Faust app with its topics and agent, ready for a worker."""
    raw, enriched, dead_letter = require("raw", "enriched", "dead_letter")
    app = faust.App(
        "millimetric-processor",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        datadir=tempfile.mkdtemp(prefix="millimetric-processor-"),
        topic_partitions=raw.partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=settings.kafka_linger_ms,
        producer_compression_type=settings.kafka_compression,
        broker_commit_interval=1.0,
    )
    bytes_topic: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    raw_topic = app.topic(raw.name, partitions=raw.partitions, **bytes_topic)
    enriched_topic = app.topic(enriched.name, partitions=enriched.partitions, **bytes_topic)
    dead_topic = app.topic(dead_letter.name, partitions=dead_letter.partitions, **bytes_topic)
    enricher = Enricher(
        settings.ip_salt_value(),
        settings.session_timeout_min,
        Classifier(),
        UserAgentParser(),
        CountryLookup(settings.geoip_path),
    )

    @app.agent(raw_topic)
    async def process(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(
            settings.processor_batch_size, within=settings.processor_batch_seconds
        ):
            for event in events:
                key, value = event.key, event.value
                try:
                    out = encode(enricher.enrich(decode(value)))
                except Exception as error:  # one bad record must not stop the partition
                    reason = f"processor: {type(error).__name__}: {error}"
                    await dead_topic.send(
                        key=b"processor",
                        value=encode(
                            {
                                "stage": "processor",
                                "reason": reason,
                                "record": value.decode("utf-8", "replace"),
                            }
                        ),
                    )
                    continue
                await enriched_topic.send(key=key, value=out)

    return app


def run(settings: Settings, bootstrap: str) -> None:
    """Run a processor worker until it is stopped (SIGINT/SIGTERM)."""
    app = build_app(settings, bootstrap)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
