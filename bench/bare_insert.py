"""The sink's baseline: raw columnar inserts of the same rows, same batch size, no Kafka.

chdb: one `INSERT ... SELECT ... FROM Python(frame)` per batch (what chdb offers for columns);
server: clickhouse-driver's columnar `execute`. The table comes from the same migration. It also
times one-row-per-insert, the naive way, over a few hundred rows.
Run: `python -m bench.bare_insert ROWS_FILE BATCH_ROWS SINGLE_ROWS (chdb DIR | server URL)`;
prints {"rows_per_s", "one_row_per_s", "peak_rss_mb"} as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ingest.records import decode
from sinks.batch import EVENT_FIELDS
from sinks.clickhouse import Features
from sinks.migrate import migrations, statements

CASTS = {
    "timestamp": "fromUnixTimestamp64Milli(timestamp)",
    "received_at": "fromUnixTimestamp64Milli(received_at)",
    "source_confidence": "toFloat32(source_confidence)",
    "is_bot": "toUInt8(is_bot)",
}
Insert = Callable[[list[str], list[list[Any]]], None]


def _features(version: str) -> Features:
    major, minor = version.strip().split(".")[:2]
    return Features((int(major), int(minor)))


def chdb_backend(path: str) -> tuple[Insert, Features]:
    """A chdb session on `path` with the events table."""
    from chdb import session

    s = session.Session(path)
    features = _features(str(s.query("SELECT version()", "TabSeparated")))
    for _, _, template in migrations():
        for statement in statements(template, features):
            s.query(statement)

    def insert(names: list[str], data: list[list[Any]]) -> None:
        frame = dict(zip(names, data, strict=True))  # noqa: F841 - read by Python(frame)
        select = ", ".join(CASTS.get(n, n) for n in names)
        s.query(f"INSERT INTO events ({', '.join(names)}) SELECT {select} FROM Python(frame)")

    return insert, features


def server_backend(url: str) -> tuple[Insert, Features]:
    """clickhouse-driver on a fresh database of the server."""
    from clickhouse_driver import Client

    parsed = urlparse(url)
    database = parsed.path.lstrip("/")
    Client(host=parsed.hostname, port=parsed.port).execute(f"CREATE DATABASE {database}")
    client = Client(host=parsed.hostname, port=parsed.port, database=database)
    features = _features(client.execute("SELECT version()")[0][0])
    for _, _, template in migrations():
        for statement in statements(template, features):
            client.execute(statement)

    def insert(names: list[str], data: list[list[Any]]) -> None:
        sql = f"INSERT INTO events ({', '.join(names)}) VALUES"
        client.execute(sql, data, columnar=True, types_check=False)

    return insert, features


def columns(rows: list[dict[str, Any]], millis: bool) -> tuple[list[str], list[list[Any]]]:
    """The rows as column lists, shaped as the sink shapes them for this server."""
    names = list(EVENT_FIELDS)
    data = [[r[n] for r in rows] for n in names]
    if not millis:  # DateTime (seconds) plus a milliseconds column, as the sink writes 18.16
        for name in ("timestamp", "received_at"):
            ms = data[names.index(name)]
            data[names.index(name)] = [x // 1000 for x in ms]
            names.append(f"{name}_ms")
            data.append([x % 1000 for x in ms])
    return names, data


def main() -> None:
    """Time the batched and the one-row inserts; print JSON."""
    rows_file, batch_rows, single_rows, kind, target = sys.argv[1:6]
    rows = [decode(line) for line in Path(rows_file).read_bytes().splitlines()]
    insert, features = chdb_backend(target) if kind == "chdb" else server_backend(target)
    millis = features.has("datetime64")
    size = int(batch_rows)
    batches = [columns(rows[i : i + size], millis) for i in range(0, len(rows), size)]
    start = time.perf_counter()
    for names, data in batches:
        insert(names, data)
    batched = len(rows) / (time.perf_counter() - start)
    singles = [columns([r], millis) for r in rows[: int(single_rows)]]
    start = time.perf_counter()
    for names, data in singles:
        insert(names, data)
    one = len(singles) / (time.perf_counter() - start)
    rss = next(
        int(line.split()[1]) / 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    print(json.dumps({"rows_per_s": batched, "one_row_per_s": one, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
