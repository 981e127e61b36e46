"""The processor: a Faust worker that enriches raw events, stitches identities, handles forgets.

The raw agent takes events in steps (`stream.take_events`): per event there is only the pure
enrichment, and the step's identity links, enriched records and dead letters go out on the
agent's own producer as Kafka batches (StepPublisher). Faust acks a step once its body returned
(or raised), so the body returns only after the broker acked every record of the step, retrying
what heals and dead-lettering what cannot: an event's offset is never committed before its
enriched record or its dead letter is on the broker (at-least-once; the sink deduplicates).
Dead letters carry no client IP (processors/dead_letters.py).

State lives in changelog-backed Faust tables, each co-partitioned with the topic its agent reads:
- `identities` (raw topic's key `project:anonymous_id` -> user_id): fills user_id in later events;
- `user_devices` (`project:user_id` -> anonymous_ids), fed through the identities topic, which
  re-keys links by user. A forget is resolved on that topic too: the forget agent only appends
  the request to the user's identities partition, so the devices agent meets it after every
  link published before it (two topics have no order between them: a forget read from the
  forgets topic could be handled before links its consumer had not fetched yet).
A forget fans out as control records on the raw topic, one per anonymous_id, so the agent that
owns each visitor's state drops it (a tombstone on the changelog) in order with their events;
an identify past the devices-per-user cap is undone the same way (an `unlink` control).
Tables live in RocksDB files under `<data_dir>/processor-tables` (or in memory, for tests).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import tomllib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faust
import faust.streams as faust_streams
from aiokafka import AIOKafkaProducer

from ingest.kafka_connection import faust_credentials, security_options
from ingest.lag import watch_in_thread
from ingest.logs import dict_config
from ingest.metrics import (
    DEAD_LETTERS,
    DEVICES_OVER_CAP,
    DROPPED,
    PROCESSED,
    STEP_SECONDS,
    set_serving,
)
from ingest.ops_port import serve
from ingest.partitioner import kafka_partitioner
from ingest.records import (
    Erasure,
    ForgetControl,
    ForgetRequest,
    IdentityLink,
    decode,
    encode,
    event_key,
    raw_records,
)
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import namespaced, require
from processors.classify import Classifier
from processors.dead_letters import Source, dead_letter_value, redact
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.hook_mapping import map_delivery
from processors.step import DeadLetters, StepPublisher
from processors.useragent import UserAgentParser

log = logging.getLogger(__name__)

# Enriched records per producer batch: a 1,000-event step fills about one per partition.
STEP_BATCH_BYTES = 512 * 1024

# Under MILLIMETRIC_DATA_DIR: the RocksDB files of the processor's tables.
TABLES_DIR = "processor-tables"
# Per table partition (12 per table): small memtables and block cache, so 24 databases stay
# inside the processor's memory budget even when full, 24 x 6 MiB (RocksDB's defaults are
# 3 x 64 MiB and 2 GiB each); identity records are ~50 bytes, 1 MiB holds ~10k of them.
ROCKSDB_OPTIONS: dict[str, Any] = {
    "driver": "rocksdict",
    "write_buffer_size": 1024 * 1024,
    "max_write_buffer_number": 2,
    "block_cache_size": 4 * 1024 * 1024,
}

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


def configured_enricher(settings: Settings, countries: CountryLookup) -> Enricher:
    """The enrichment the settings configure (the live agent's, and `millimetric replay`'s)."""
    return Enricher(
        settings.ip_salt_value(),
        settings.session_timeout_min,
        Classifier(),
        UserAgentParser(),
        countries,
        project_classifiers(settings.project_rules_path),
    )


def identity_link(identify: dict[str, Any]) -> IdentityLink:
    """The identities-topic record an identify event produces."""
    return {
        "v": 1,
        "project": identify["project"],
        "at": identify["received_at"],
        "anonymous_id": identify["anonymous_id"],
        "user_id": identify["user_id"],
    }


@dataclass(frozen=True, slots=True)
class Entry:
    """One event of a step: the Faust event (record) carrying it, its place in that record's
    envelope, and its key (the identities table's)."""

    event: Any
    index: int
    key: bytes

    def source(self) -> Source:
        """Where it was read, for its dead letter."""
        message = self.event.message
        return Source(message.topic, message.partition, message.offset, self.index)


def point_tables_at(event: Any) -> None:
    """Make `event` the one Faust's tables see: its partition picks the store and changelog
    partition of a key. Only the context variable the tables read: take_events pairs each
    buffered value with the stream's `current_event` attribute, so setting that one from the
    agent body (`Stream._set_current_event`) paired events of the next step with this step's,
    repeating one event and losing another."""
    faust_streams._current_event.set(weakref.ref(event))


def build_app(settings: Settings, bootstrap: str) -> faust.App:
    """The Faust app with its topics, tables and agents, ready for a worker."""
    raw, enriched, dead, links, forgets, erasures = require(
        "raw", "enriched", "dead_letter", "identities", "forgets", "erasures"
    )
    extra: dict[str, Any] = {}
    if settings.processor_producer_max_batch_size is not None:
        extra["producer_max_batch_size"] = settings.processor_producer_max_batch_size
    persistent = settings.processor_table_store == "rocksdb"
    app = faust.App(
        namespaced("millimetric-processor"),
        broker=f"kafka://{bootstrap}",
        broker_credentials=faust_credentials(settings),
        store="rocksdb://" if persistent else "memory://",
        # The local store may be ahead of a broker that lost its topics (`dev`'s in-memory
        # broker after a restart): keep the local tables rather than refuse to start.
        recovery_consistency_check=not persistent,
        web_enabled=settings.processor_port is not None,
        web_port=settings.processor_port or 6066,
        web_bind="127.0.0.1",
        datadir=str(settings.data_dir.resolve() / TABLES_DIR)
        if persistent
        else tempfile.mkdtemp(prefix="millimetric-processor-"),
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
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=settings.kafka_session_timeout_s / 5,
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

    def options() -> dict[str, Any] | None:
        # Faust pops from a table's options: a copy each.
        return dict(ROCKSDB_OPTIONS) if persistent else None

    identities = app.Table("identities", partitions=raw.partitions, options=options(), **table)
    user_devices = app.Table(
        "user-devices", partitions=links.partitions, options=options(), **table
    )
    countries = CountryLookup(settings.geoip_path)
    log.warning("geo: %s", countries.description)

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """Whether the worker runs with a geo database (country is empty without one)."""
        return web.json(
            {"ok": True, "geo_available": countries.available, "geo": countries.description}
        )

    enricher = configured_enricher(settings, countries)

    async def dead_letter(value: bytes, error: Exception) -> None:
        # A forget request carries no IP: kept whole.
        DEAD_LETTERS.labels("processor", "forget_failed").inc()
        await dead_topic.send(
            key=b"processor",
            value=encode(
                {
                    "stage": "processor",
                    "reason": f"forget_failed: {type(error).__name__}: {error}",
                    "record": value.decode("utf-8", "replace"),
                }
            ),
        )

    def letter(reason: str, error: Exception, at: Entry, record: dict[str, Any]) -> bytes:
        """A dead letter for a decoded raw record, its IP replaced by what enrichment derives."""
        try:
            derived: dict[str, str] | None = dict(enricher.ip_derived(record))  # type: ignore[arg-type]
        except Exception:  # what failed may be this very derivation: then keep neither
            derived = None
        context = record.get("context")
        return dead_letter_value(
            reason,
            error,
            at.source(),
            redact(record, derived),
            context.get("ip") if isinstance(context, dict) else None,
        )

    def undecodable(at: Entry, error: Exception, dead: DeadLetters) -> None:
        # No content is kept: it could hold an IP anywhere, and no retry could decode it.
        dead.add("undecodable", dead_letter_value("undecodable", error, at.source(), None, None))

    def unpack(
        events: Sequence[Any], size: int
    ) -> Iterator[tuple[list[Entry], list[Any], DeadLetters]]:
        """A step's records as their events in order (an envelope's each) with their keys, in
        parts of about `size` events (an envelope is never split); an undecodable record or
        envelope entry is dead-lettered alone."""
        entries: list[Entry] = []
        records: list[dict[str, Any] | None] = []
        dead = DeadLetters()
        for event in events:
            try:
                values = raw_records(event.value)
            except Exception as error:
                undecodable(Entry(event, 0, event.key), error, dead)
                continue
            for index, record in enumerate(values):
                # An envelope is keyed by its first event: the others carry their own key.
                key = event.key
                try:
                    if not isinstance(record, dict):
                        raise TypeError(f"a JSON {type(record).__name__}, not an object")
                    if index:
                        key = event_key(record)
                except Exception as error:
                    undecodable(Entry(event, index, key), error, dead)
                    continue
                entries.append(Entry(event, index, key))
                records.append(record)
            if len(entries) >= size:
                yield entries, records, dead
                entries, records, dead = [], [], DeadLetters()
        yield entries, records, dead

    async def handle_step(events: Sequence[Any], publisher: StepPublisher) -> None:
        """Enrich a step's events and publish everything it produced, in parts of at most about
        `processor_batch_size` events (so memory stays bounded however many events its envelopes
        hold); returns once all is acked."""
        for entries, records, dead in unpack(events, settings.processor_batch_size):
            await handle_part(entries, records, dead, publisher)

    async def handle_part(
        entries: list[Entry], records: list[Any], dead: DeadLetters, publisher: StepPublisher
    ) -> None:
        """Enrich these events and publish what they produce; returns once all is acked."""
        # A webhook delivery becomes an event here, after the gateway made it durable.
        for index, record in enumerate(records):
            if record is not None and record.get("type") == "webhook":
                try:
                    records[index] = map_delivery(record, settings.properties_max_bytes)
                except Exception as error:
                    dead.add("unmappable", letter("unmappable", error, entries[index], record))
                    records[index] = None

        # Links first: the identities table takes a link only once the links topic holds it,
        # so the table never knows a device that a forget of its user would not find.
        links: list[tuple[bytes, bytes]] = []
        linked: list[int] = []
        for index, record in enumerate(records):
            if record is not None and record.get("type") == "identify":
                try:
                    link = encode(identity_link(record))
                except Exception as error:
                    failed = letter("enrich_failed", error, entries[index], record)
                    dead.add("enrich_failed", failed)
                    records[index] = None
                    continue
                links.append((f"{record['project']}:{record['user_id']}".encode(), link))
                linked.append(index)

        def link_refused(at: int, error: Exception) -> None:
            index = linked[at]
            dead.add("link_refused", letter("link_refused", error, entries[index], records[index]))
            records[index] = None

        await publisher.publish(publisher.links, links, link_refused)

        heartbeats = 0
        pointed = None
        out: list[tuple[bytes, bytes]] = []
        sources: list[int] = []
        for index, (entry, record) in enumerate(zip(entries, records, strict=True)):
            if record is None:
                continue
            key = entry.key
            try:
                kind = record["type"]
                if kind == "heartbeat":  # a sink's probe: on to the sinks as it came, uncounted
                    out.append((key, encode(record)))
                    sources.append(index)
                    heartbeats += 1
                    continue
                if entry.event is not pointed:  # an envelope's events share its partition
                    point_tables_at(entry.event)
                    pointed = entry.event
                if kind in ("forget", "unlink"):
                    identities.pop(key, None)
                    continue
                if kind == "identify":
                    identities[key] = record["user_id"].encode()
                known = identities.get(key) if record["user_id"] is None else None
                enriched_event = enricher.enrich(record, known.decode() if known else None)  # type: ignore[arg-type]
                if enriched_event["is_bot"] and settings.drop_bots:
                    DROPPED.labels("bot").inc()
                    continue
                out.append((key, encode(enriched_event)))
            except Exception as error:  # one bad record must not stop the partition
                dead.add("enrich_failed", letter("enrich_failed", error, entry, record))
                continue
            sources.append(index)

        def too_large(at: int, error: Exception) -> None:
            index = sources[at]
            failed = letter("record_too_large", error, entries[index], records[index])  # type: ignore[arg-type]
            dead.add("record_too_large", failed)

        if settings.envelopes:
            await publisher.publish_envelopes(publisher.enriched, out, too_large)
        else:
            await publisher.publish(publisher.enriched, out, too_large)
        await publisher.publish_dead_letters(dead)
        PROCESSED.inc(len(out) - heartbeats)

    @app.agent(raw_topic)
    async def process(stream: faust.StreamT[bytes]) -> None:
        # A producer of its own, so a step's records go out as whole batches (BatchPublisher)
        # and every send of the step is awaited before take_events acks it.
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **security_options(settings),
            acks="all",
            enable_idempotence=settings.kafka_idempotence,
            linger_ms=settings.kafka_linger_ms,
            compression_type=settings.kafka_compression,
            # A batch is one message to the broker's size limit, as a record is.
            max_batch_size=settings.processor_producer_max_batch_size
            or min(STEP_BATCH_BYTES, settings.processor_max_record_bytes),
            max_request_size=settings.processor_max_record_bytes,
            partitioner=kafka_partitioner,
        )
        await producer.start()
        publisher = StepPublisher(
            producer, settings.processor_max_record_bytes, enriched.name, links.name, dead.name
        )
        set_serving("processor", True)
        try:
            async for events in stream.take_events(
                settings.processor_batch_size, within=settings.processor_batch_seconds
            ):
                started = time.perf_counter()
                # take_events acks the step after this body: only once every record is acked.
                await handle_step(events, publisher)
                STEP_SECONDS.observe(time.perf_counter() - started)
        finally:
            set_serving("processor", False)
            await producer.stop()

    @app.agent(links_topic)
    async def remember_devices(stream: faust.StreamT[bytes]) -> None:
        cap = settings.processor_max_devices_per_user
        async for event in stream.events():
            record = decode(event.value)
            if "forget_id" in record:  # put here by the forget agent, which checked it
                await resolve_forget(event.key, event.value)
                continue
            link: IdentityLink = record
            project, anonymous_id = link["project"], link["anonymous_id"]
            devices = set(decode(user_devices.get(event.key) or b"[]"))
            if anonymous_id in devices:
                continue
            if len(devices) < cap:
                user_devices[event.key] = encode(sorted(devices | {anonymous_id}))
                continue
            # Past the cap the device is unlinked (its identities entry dropped, in order with
            # its events), so the processor never stitches a device a forget would not find.
            DEVICES_OVER_CAP.inc()
            log.warning(
                "a user of project %s has %d devices (the cap): unlinking one", project, cap
            )
            unlink: ForgetControl = {
                "v": 1,
                "type": "unlink",
                "project": project,
                "anonymous_id": anonymous_id,
                "forget_id": "",
            }
            await raw_topic.send(key=f"{project}:{anonymous_id}".encode(), value=encode(unlink))

    @app.agent(forgets_topic)
    async def forget(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                request = decode(event.value)
                if not isinstance(request, dict) or "forget_id" not in request:
                    raise TypeError("not a forget request")
            except (ValueError, TypeError) as error:  # not a forget: nothing to retry
                await dead_letter(event.value, error)
                continue
            # Same key as the user's links: behind them on the same partition, delivered before
            # this event is acked.
            await retrying("forget forward", partial(send_delivered, links_topic, event))

    async def send_delivered(topic: Any, event: Any) -> None:
        """Append `event` to `topic` under its key, delivered, not only queued."""
        await (await topic.send(key=event.key, value=event.value))

    async def resolve_forget(key: bytes, value: bytes) -> None:
        """A forget met on the links topic: every device linked before it, erased."""
        try:
            request: ForgetRequest = decode(value)
            project, user_id = request["project"], request["user_id"]
            devices = {request["anonymous_id"]} - {None}
            if user_id is not None:
                devices.update(decode(user_devices.pop(key, None) or b"[]"))
            erasure: Erasure = {
                "v": 1,
                "forget_id": request["forget_id"],
                "project": project,
                "user_id": user_id,
                "anonymous_ids": sorted(devices),  # type: ignore[arg-type]
                "cutoff": request["received_at"],
                "suppress": request["suppress"],
                "requested_at": request["received_at"],
            }
        except (KeyError, TypeError) as error:  # not a whole forget: nothing to retry
            await dead_letter(value, error)
            return
        # A broker hiccup must not drop a forget (the event is acked after this returns).
        await retrying("forget publish", partial(publish_forget, key, erasure))

    async def publish_forget(key: bytes, erasure: Erasure) -> None:
        """The control records (one per device) and the erasure, delivered, not only queued."""
        sent = []
        for anonymous_id in erasure["anonymous_ids"]:
            control: ForgetControl = {
                "v": 1,
                "type": "forget",
                "project": erasure["project"],
                "anonymous_id": anonymous_id,
                "forget_id": erasure["forget_id"],
            }
            sent.append(
                await raw_topic.send(
                    key=f"{erasure['project']}:{anonymous_id}".encode(), value=encode(control)
                )
            )
        sent.append(await erasures_topic.send(key=key, value=encode(erasure)))
        await asyncio.gather(*sent)

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
