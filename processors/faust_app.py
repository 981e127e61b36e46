"""The processor's Faust app: its topics and its changelog-backed tables, for the agents to use.

The agents live one per module (`events_agent.py`, `devices_agent.py`, `forgets_agent.py`) and
take what they need from the `Processor` made here; `app.py` puts them together and runs them.
The one use of Faust's private API (`point_tables_at`) is here too.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import faust
import faust.streams as faust_streams

from ingest.kafka_connection import faust_credentials
from ingest.partitioner import kafka_partitioner
from ingest.settings import Settings
from ingest.topics import Topic, namespaced, require

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


@dataclass
class Processor:
    """What the agents share: the app, the settings, the topics and the tables."""

    app: faust.App
    settings: Settings
    bootstrap: str
    enriched: Topic
    links: Topic
    dead: Topic
    raw_topic: Any
    dead_topic: Any
    links_topic: Any
    forgets_topic: Any
    erasures_topic: Any
    identities: Any  # raw topic's key `project:anonymous_id` -> user_id
    user_devices: Any  # `project:user_id` -> anonymous_ids, co-partitioned with the links


def new_processor(settings: Settings, bootstrap: str) -> Processor:
    """The Faust app with its topics and tables, no agent yet."""
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

    return Processor(
        app=app,
        settings=settings,
        bootstrap=bootstrap,
        enriched=enriched,
        links=links,
        dead=dead,
        raw_topic=app.topic(raw.name, partitions=raw.partitions, **BYTES),
        dead_topic=app.topic(dead.name, partitions=dead.partitions, **BYTES),
        links_topic=app.topic(links.name, partitions=links.partitions, **BYTES),
        forgets_topic=app.topic(forgets.name, partitions=forgets.partitions, **BYTES),
        erasures_topic=app.topic(erasures.name, partitions=erasures.partitions, **BYTES),
        identities=app.Table("identities", partitions=raw.partitions, options=options(), **table),
        user_devices=app.Table(
            "user-devices", partitions=links.partitions, options=options(), **table
        ),
    )


def point_tables_at(event: Any) -> None:
    """Make `event` the one Faust's tables see: its partition picks the store and changelog
    partition of a key. Only the context variable the tables read: take_events pairs each
    buffered value with the stream's `current_event` attribute, so setting that one from the
    agent body (`Stream._set_current_event`) paired events of the next step with this step's,
    repeating one event and losing another."""
    faust_streams._current_event.set(weakref.ref(event))
