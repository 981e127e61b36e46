"""The events agent: raw events in, enriched events out, in steps.

The agent takes events in steps (`stream.take_events`): per event there is only the pure
enrichment, and the step's identity links, enriched records and dead letters go out on the
agent's own producer as Kafka batches (StepPublisher). Faust acks a step once its body returned
(or raised), so the body returns only after the broker acked every record of the step, retrying
what heals and dead-lettering what cannot: an event's offset is never committed before its
enriched record or its dead letter is on the broker (at-least-once; the sink deduplicates).
Dead letters carry no client IP (processors/dead_letters.py).

It keeps the `identities` table (raw topic's key `project:anonymous_id` -> user_id) to fill
user_id in later events, and drops a visitor's entry on a `forget` or `unlink` control record,
in order with their events.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from ingest.kafka_connection import security_options
from ingest.metrics import DROPPED, PROCESSED, STEP_SECONDS, set_serving
from ingest.partitioner import kafka_partitioner
from ingest.records import IdentityLink, encode, event_key, raw_records
from ingest.settings import Settings
from processors.classify import Classifier
from processors.dead_letters import Source, dead_letter_value, redact
from processors.enrich import Enricher
from processors.faust_app import Processor, point_tables_at
from processors.geo import CountryLookup
from processors.hook_mapping import map_delivery
from processors.step import DeadLetters, StepPublisher
from processors.useragent import UserAgentParser

# Enriched records per producer batch: a 1,000-event step fills about one per partition.
STEP_BATCH_BYTES = 512 * 1024


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


def add_events_agent(p: Processor, enricher: Enricher) -> None:
    """The agent that enriches raw events with `enricher`."""
    settings = p.settings

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
                    p.identities.pop(key, None)
                    continue
                if kind == "identify":
                    p.identities[key] = record["user_id"].encode()
                known = p.identities.get(key) if record["user_id"] is None else None
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

    @p.app.agent(p.raw_topic)
    async def process(stream: faust.StreamT[bytes]) -> None:
        # A producer of its own, so a step's records go out as whole batches (BatchPublisher)
        # and every send of the step is awaited before take_events acks it.
        producer = AIOKafkaProducer(
            bootstrap_servers=p.bootstrap,
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
            producer,
            settings.processor_max_record_bytes,
            p.enriched.name,
            p.links.name,
            p.dead.name,
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
