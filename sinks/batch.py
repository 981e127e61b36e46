"""The sink's open batch: events as column lists, bounded by rows and age, with their offsets.

Appending is one list append per column; the insert then hands the lists to ClickHouse as they
are. The batch remembers the next offset of every partition it holds, which is what is committed
once ClickHouse has accepted it.
"""

from __future__ import annotations

import operator
import time
from typing import Any

from aiokafka import TopicPartition

from ingest.records import EnrichedEvent

# Columns of `events` that come straight from the enriched record, in insert order.
EVENT_FIELDS: tuple[str, ...] = (
    "project",
    "event_id",
    "type",
    "event",
    "timestamp",
    "received_at",
    "anonymous_id",
    "user_id",
    "session_id",
    "url",
    "path",
    "referrer",
    "properties",
    "source",
    "medium",
    "campaign",
    "channel",
    "source_confidence",
    "source_rule_id",
    "click_id",
    "click_id_network",
    "classifier_version",
    "country",
    "device_type",
    "browser",
    "os",
    "is_bot",
    "ip_hash",
)


# The derivation's version (sinks/migrations/0005): 0 from the live processor, which sends none.
VERSION = "version"
COLUMNS: tuple[str, ...] = (*EVENT_FIELDS, VERSION)

_ROW = operator.itemgetter(*EVENT_FIELDS)


def _month(millis: int) -> int:
    """The UTC month of a timestamp, as a number that orders months."""
    t = time.gmtime(millis // 1000)
    return t.tm_year * 12 + t.tm_mon


class EventBatch:
    """Column buffers for one insert."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        self._appenders = [self.columns[name].append for name in EVENT_FIELDS]
        self._extenders = [self.columns[name].extend for name in EVENT_FIELDS]
        self._versions = self.columns[VERSION]
        self.rows = 0
        self.started = 0.0
        self.next_offsets: dict[TopicPartition, int] = {}

    def add(self, event: EnrichedEvent) -> None:
        """Append one event's values; a record missing a field raises before any column grows."""
        row = _ROW(event)  # one C call for all fields
        if not self.rows:
            self.started = time.monotonic()
        for append, value in zip(self._appenders, row, strict=True):
            append(value)
        self._versions.append(event.get(VERSION, 0))
        self.rows += 1

    def add_all(self, events: list[EnrichedEvent]) -> bool:
        """Append every event of an envelope at once; False, with no column grown, when one is
        not a complete row (a heartbeat, a poison event): the caller then adds them one by one."""
        try:
            rows = list(map(_ROW, events))  # one C call per event, all or nothing
        except (KeyError, TypeError):
            return False
        if not rows:
            return True
        if not self.rows:
            self.started = time.monotonic()
        for extend, column in zip(self._extenders, zip(*rows, strict=True), strict=True):
            extend(column)  # the transposition runs in C: no Python step per value
        self._versions.extend([event.get(VERSION, 0) for event in events])
        self.rows += len(rows)
        return True

    def split(self) -> tuple[EventBatch, EventBatch]:
        """Two halves of the rows (offsets stay with the caller's batch): to find a bad row."""
        half = self.rows // 2
        halves = (EventBatch(), EventBatch())
        for part, rows in zip(halves, (slice(0, half), slice(half, self.rows)), strict=True):
            for name, values in self.columns.items():
                part.columns[name].extend(values[rows])
            part.rows = len(part.columns[EVENT_FIELDS[0]])
        return halves

    def split_by_month(self) -> tuple[EventBatch, EventBatch]:
        """Two batches holding half of the rows' months each: the events table is partitioned by
        toYYYYMM(timestamp) (UTC), so each half creates half the partitions. One month: halves."""
        months = [_month(ms) for ms in self.columns["timestamp"]]
        distinct = sorted(set(months))
        if len(distinct) < 2:
            return self.split()
        cut = distinct[len(distinct) // 2]
        early = [month < cut for month in months]
        return self.keep(early), self.keep([not e for e in early])

    def keep(self, mask: list[bool]) -> EventBatch:
        """A batch of the rows whose mask entry is true (offsets stay with the caller's batch)."""
        part = EventBatch()
        for name, values in self.columns.items():
            part.columns[name].extend(v for v, k in zip(values, mask, strict=True) if k)
        part.rows = sum(mask)
        return part

    def row(self, index: int) -> dict[str, Any]:
        """One row as a record (for the dead-letter topic)."""
        return {name: values[index] for name, values in self.columns.items()}

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        """Record that everything up to `offset` of `tp` is in this batch (or dead-lettered)."""
        self.next_offsets[tp] = offset + 1

    def age(self) -> float:
        """Seconds since the first row arrived (0 when empty)."""
        return time.monotonic() - self.started if self.rows else 0.0

    def drop_partitions(self, revoked: set[TopicPartition]) -> None:
        """Forget offsets of partitions this sink no longer owns (their rows are still valid)."""
        for tp in revoked:
            self.next_offsets.pop(tp, None)
