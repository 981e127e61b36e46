"""Writes batches of events to ClickHouse as one columnar insert each."""

from __future__ import annotations

import time
from typing import Any

from ingest.metrics import observe_insert
from sinks.batch import COLUMNS, EventBatch
from sinks.clickhouse import ClickHouse

TIME_FIELDS = frozenset({"timestamp", "received_at"})

# How chdb's Python() table function turns each Python list into the column's type.
CHDB_CASTS: dict[str, str] = {
    "timestamp": "fromUnixTimestamp64Milli(timestamp)",
    "received_at": "fromUnixTimestamp64Milli(received_at)",
    "source_confidence": "toFloat32(source_confidence)",
    "is_bot": "toUInt8(is_bot)",
    "version": "toUInt64(version)",
}


class EventWriter:
    """Inserts event batches into `events`, shaped for the server's version."""

    def __init__(self, ch: ClickHouse) -> None:
        self._ch = ch
        self._millis = ch.features.has("datetime64")
        self._select = [CHDB_CASTS.get(name, name) for name in COLUMNS]

    def insert(self, batch: EventBatch) -> None:
        """One insert of the whole batch; raises if ClickHouse refuses it."""
        if not batch.rows:
            return
        started = time.perf_counter()
        names = list(COLUMNS)
        data: list[list[Any]] = [batch.columns[name] for name in names]
        if not self._millis:
            # DateTime holds seconds; the milliseconds go to their own columns.
            for name in TIME_FIELDS:
                millis = batch.columns[name]
                data[names.index(name)] = [ms // 1000 for ms in millis]
                names.append(f"{name}_ms")
                data.append([ms % 1000 for ms in millis])
        self._ch.insert_columns("events", names, data, self._select)
        observe_insert(batch.columns["received_at"], started)
