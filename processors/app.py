"""The processor: a Faust worker that enriches raw events, stitches identities, handles forgets.

The raw agent takes events in steps (`stream.take_events`): per event there is only the pure
enrichment, and the step's enriched records go out as one Kafka batch per partition
(BatchPublisher). Faust acks a step only after its body returned, which is after the broker acked
every enriched record, so an event's offset is never committed before its enriched record is on
the broker (at-least-once; the sink deduplicates). Records that cannot be handled go to the
dead-letter topic.

State lives in changelog-backed Faust tables, each co-partitioned with the topic its agent reads:
- `identities` (raw topic's key `project:anonymous_id` -> user_id): fills user_id in later events;
- `user_devices` (`project:user_id` -> anonymous_ids), fed through the identities topic, which
  re-keys links by user: the forget agent reads the forgets topic, keyed the same way.
A forget fans out as control records on the raw topic, one per anonymous_id, so the agent that
owns each visitor's state drops it (a tombstone on the changelog) in order with their events.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from ingest.lag import watch_in_thread
from ingest.logs import dict_config
from ingest.metrics import DEAD_LETTERS, DROPPED, PROCESSED, STEP_SECONDS, set_serving
from ingest.ops_port import serve
from ingest.partitioner import kafka_partitioner
from ingest.records import Erasure, ForgetControl, ForgetRequest, IdentityLink, decode, encode
from ingest.settings import Settings
from ingest.topics import require
from processors.batch_publisher import BatchPublisher
from processors.classify import Classifier
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.useragent import UserAgentParser

log = logging.getLogger(__name__)

# Enriched records per producer batch: a 1,000-event step fills about one per partition.
STEP_BATCH_BYTES = 512 * 1024

BYTES: dict[str, Any] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


def project_classifiers(path: Path | None) -> dict[str, Classifier]:
    """Per-project classifiers from the rules file (`[[project]]` arrays of rules)."""
    if path is None:
        return {}
    with path.open("rb") as f:
        table = tomllib.load(f)
    return {project: Classifier(rules) for project, rules in table.items()}


def identity_link(identify: dict[str, Any]) -> IdentityLink:
    """The identities-topic record an identify event produces."""
    return {
        "v": 1,
        "project": identify["project"],
        "at": identify["received_at"],
        "anonymous_id": identify["anonymous_id"],
        "user_id": identify["user_id"],
    }


async def publish_until_acked(
    publisher: BatchPublisher, records: list[tuple[bytes, bytes]]
) -> None:
    """Publish a step, retrying with capped backoff while the broker fails it (after the
    producer's own retries): the step stays unacked meanwhile, so its offsets stay uncommitted,
    and records already delivered by a failed attempt are repeated (the sink deduplicates).

    Any error is retried, not raised: Faust's `take_events` acks a step's events when the agent
    body leaves by an exception too, which would commit records that were never published."""
    delay = 0.5
    while True:
        try:
            await publisher.publish(records)
            return
        except Exception as error:
            log.warning("publishing %d records failed (%r); retrying in %.1fs", len(records),
                        error, delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def build_app(settings: Settings, bootstrap: str) -> faust.App:
    """The Faust app with its topics, tables and agents, ready for a worker."""
    raw, enriched, dead, links, forgets, erasures = require(
        "raw", "enriched", "dead_letter", "identities", "forgets", "erasures"
    )
    extra: dict[str, Any] = {}
    if settings.processor_producer_max_batch_size is not None:
        extra["producer_max_batch_size"] = settings.processor_producer_max_batch_size
    app = faust.App(
        "millimetric-processor",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=settings.processor_port is not None,
        web_port=settings.processor_port or 6066,
        web_bind="127.0.0.1",
        datadir=tempfile.mkdtemp(prefix="millimetric-processor-"),
        topic_partitions=raw.partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=settings.kafka_linger_ms,
        producer_compression_type=settings.kafka_compression,
        producer_partitioner=kafka_partitioner,
        broker_commit_interval=1.0,
        # A replacement worker waits out its predecessor's session when the broker does not
        # act on LeaveGroup (Tansu): keep that wait short.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        **extra,
    )
    raw_topic = app.topic(raw.name, partitions=raw.partitions, **BYTES)
    dead_topic = app.topic(dead.name, partitions=dead.partitions, **BYTES)
    links_topic = app.topic(links.name, partitions=links.partitions, **BYTES)
    forgets_topic = app.topic(forgets.name, partitions=forgets.partitions, **BYTES)
    erasures_topic = app.topic(erasures.name, partitions=erasures.partitions, **BYTES)
    # key_type/value_type, not only the schema, decide how the changelog is read back: without
    # them Faust decodes raw bytes as JSON on recovery and waits forever for dropped records.
    table: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "schema": faust.Schema(**BYTES),
    }
    identities = app.Table("identities", partitions=raw.partitions, **table)
    user_devices = app.Table("user-devices", partitions=links.partitions, **table)
    countries = CountryLookup(settings.geoip_path)
    log.warning("geo: %s", countries.description)

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """Whether the worker runs with a geo database (country is empty without one)."""
        return web.json(
            {"ok": True, "geo_available": countries.available, "geo": countries.description}
        )

    enricher = Enricher(
        settings.ip_salt_value(),
        settings.session_timeout_min,
        Classifier(),
        UserAgentParser(),
        countries,
        project_classifiers(settings.project_rules_path),
    )

    async def dead_letter(value: bytes, error: Exception) -> None:
        DEAD_LETTERS.labels("processor", "unprocessable").inc()
        await dead_topic.send(
            key=b"processor",
            value=encode(
                {
                    "stage": "processor",
                    "reason": f"processor: {type(error).__name__}: {error}",
                    "record": value.decode("utf-8", "replace"),
                }
            ),
        )

    @app.agent(raw_topic)
    async def process(stream: faust.StreamT[bytes]) -> None:
        # A producer of its own, so a step's records go out as whole batches (BatchPublisher).
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=settings.kafka_idempotence,
            linger_ms=settings.kafka_linger_ms,
            compression_type=settings.kafka_compression,
            max_batch_size=settings.processor_producer_max_batch_size or STEP_BATCH_BYTES,
            partitioner=kafka_partitioner,
        )
        await producer.start()
        publisher = BatchPublisher(producer, enriched.name)
        set_serving("processor", True)
        try:
            async for events in stream.take_events(
                settings.processor_batch_size, within=settings.processor_batch_seconds
            ):
                started = time.perf_counter()
                out: list[tuple[bytes, bytes]] = []
                for event in events:
                    key, value = event.key, event.value
                    try:
                        record = decode(value)
                        kind = record["type"]
                        if kind == "heartbeat":  # a sink's probe: on to the sinks, uncounted
                            await publish_until_acked(publisher, [(key, value)])
                            continue
                        if kind == "forget":
                            # Tables pick the changelog partition from the current event,
                            # which take_events does not set per item.
                            stream._set_current_event(event)
                            identities.pop(key, None)
                            continue
                        if kind == "identify":
                            stream._set_current_event(event)
                            identities[key] = record["user_id"].encode()
                            await links_topic.send(
                                key=f"{record['project']}:{record['user_id']}".encode(),
                                value=encode(identity_link(record)),
                            )
                        known = identities.get(key) if record["user_id"] is None else None
                        enriched_event = enricher.enrich(record, known.decode() if known else None)
                    except Exception as error:  # one bad record must not stop the partition
                        await dead_letter(value, error)
                        continue
                    if enriched_event["is_bot"] and settings.drop_bots:
                        DROPPED.labels("bot").inc()
                        continue
                    out.append((key, encode(enriched_event)))
                # take_events acks the step after this body: only once every record is acked.
                await publish_until_acked(publisher, out)
                PROCESSED.inc(len(out))
                STEP_SECONDS.observe(time.perf_counter() - started)
        finally:
            set_serving("processor", False)
            await producer.stop()

    @app.agent(links_topic)
    async def remember_devices(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            link: IdentityLink = decode(event.value)
            devices = set(decode(user_devices.get(event.key) or b"[]"))
            if link["anonymous_id"] not in devices:
                user_devices[event.key] = encode(sorted(devices | {link["anonymous_id"]}))

    @app.agent(forgets_topic)
    async def forget(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                request: ForgetRequest = decode(event.value)
                project = request["project"]
                devices: set[str] = set()
                if request["user_id"] is not None:
                    devices.update(decode(user_devices.pop(event.key, None) or b"[]"))
                if request["anonymous_id"] is not None:
                    devices.add(request["anonymous_id"])
                for anonymous_id in sorted(devices):
                    control: ForgetControl = {
                        "v": 1,
                        "type": "forget",
                        "project": project,
                        "anonymous_id": anonymous_id,
                        "forget_id": request["forget_id"],
                    }
                    await raw_topic.send(
                        key=f"{project}:{anonymous_id}".encode(), value=encode(control)
                    )
                erasure: Erasure = {
                    "v": 1,
                    "forget_id": request["forget_id"],
                    "project": project,
                    "user_id": request["user_id"],
                    "anonymous_ids": sorted(devices),
                    "cutoff": request["received_at"],
                    "suppress": request["suppress"],
                    "requested_at": request["received_at"],
                }
                await erasures_topic.send(key=event.key, value=encode(erasure))
            except Exception as error:
                await dead_letter(event.value, error)

    return app


def run(settings: Settings, bootstrap: str) -> None:
    """Run a processor worker until it is stopped (SIGINT/SIGTERM)."""
    app = build_app(settings, bootstrap)
    serve("processor", settings.processor_metrics_port, settings.metrics_host)
    # The sink's lag too: it must grow while no sink runs.
    watch_in_thread(bootstrap, ("processor", "sink"), "processor", settings)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=dict_config(settings.log_level),
    )
    # Faust's terminal spinner lowers the root logger to DEBUG so that every log call spins it:
    # every debug call on the hot path then builds a LogRecord. No spinner, no such cost.
    worker.spinner = None
    worker.execute_from_commandline()
