"""`millimetric backfill FILE...`: history in through /v1/batch, resumable, losing no line.

Each file (NDJSON, one spec event a line, or CSV with a header; `.gz`/`.zst` compressed too) is
sent in batches on the historical lane (`HISTORICAL_HEADER`: its own rate-limit class). Sending
reuses the Python client's delivery (413 splitting, `Retry-After` on 429/503, backoff). An event
without `event_id` gets one derived from its line's number and bytes, so a file sent twice
stores each event once. A line that is not an event, or that the gateway refuses, goes to
`FILE.rejects.ndjson` with its line number and the error. After each settled batch the number of
lines done is written to `FILE.backfill-checkpoint`: a run interrupted anywhere resumes after the
last settled batch (re-sending at most that one batch, which the event ids make harmless).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ingest.progress import Progress
from millimetric.delivery import Delivery
from millimetric.messages import Message
from millimetric.transport import Transport

HISTORICAL_HEADER = "X-Millimetric-Lane"  # value "historical": see gateway/rate_limit.py
# the lines to blame (a 413 reaches here only for a single event: larger batches are split)
LINE_REJECTS = frozenset({"invalid_payload", "invalid_json", "unserializable", "payload_too_large"})


class BackfillAborted(Exception):
    """The gateway refused a batch for a reason no line is to blame for (a bad key, ...)."""


@dataclass(slots=True)
class Line:
    """One line of a file: its number, and the event it holds or why it holds none."""

    number: int
    event: dict[str, Any] | None
    error: str = ""
    text: str = ""
    message: str = ""


@dataclass(slots=True)
class Summary:
    """What a run did with one file."""

    path: Path
    lines: int = 0  # settled in this run (accepted + rejected + blank)
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0  # lines a checkpoint said were already done
    retries: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        """One line for the terminal."""
        retries = ", ".join(f"{k}: {v}" for k, v in sorted(self.retries.items())) or "none"
        return (
            f"{self.path}: {self.accepted} accepted, {self.rejected} rejected"
            f" (see {rejects_path(self.path)}), {self.skipped} already done before; "
            f"retries {retries}"
        )


def checkpoint_path(path: Path) -> Path:
    """Where the progress of `path` is kept."""
    return path.with_name(path.name + ".backfill-checkpoint")


def rejects_path(path: Path) -> Path:
    """Where the lines of `path` that were not accepted go."""
    return path.with_name(path.name + ".rejects.ndjson")


def event_id(number: int, raw: bytes) -> str:
    """The id of an event sent without one: the same line of the same file always gets it."""
    return hashlib.sha256(b"%d:" % number + raw.rstrip(b"\r\n")).hexdigest()[:32]


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return zstandard.open(path, "rb")
    return path.open("rb")


def _is_csv(path: Path) -> bool:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    return name.endswith(".csv")


def _ndjson(stream: IO[bytes]) -> Iterator[Line]:
    for number, raw in enumerate(stream, 1):
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            yield Line(number, None)
            continue
        try:
            event = json.loads(text)
        except ValueError as error:
            yield Line(number, None, "invalid_json", text, str(error))
            continue
        if not isinstance(event, dict):
            yield Line(number, None, "invalid_json", text, "not a JSON object")
            continue
        event.setdefault("event_id", event_id(number, raw))
        yield Line(number, event, text=text)


def _csv(stream: IO[bytes]) -> Iterator[Line]:
    """CSV with a header naming spec fields; `properties.NAME` columns fill `properties`."""
    reader = csv.DictReader(io.TextIOWrapper(stream, "utf-8", errors="replace", newline=""))
    for row in reader:
        number = reader.line_num
        event: dict[str, Any] = {}
        properties: dict[str, Any] = {}
        for column, value in row.items():
            if column is None or value in (None, ""):
                continue  # a short row leaves cells out; None holds a long row's surplus
            if column.startswith("properties."):
                properties[column.removeprefix("properties.")] = value
            else:
                event[column] = value
        if properties:
            event["properties"] = properties
        text = json.dumps(row, ensure_ascii=False)
        if not event:
            yield Line(number, None)
            continue
        event.setdefault("event_id", event_id(number, text.encode()))
        yield Line(number, event, text=text)


def read_lines(path: Path) -> Iterator[Line]:
    """Every line (CSV: every record) of a file, in order, numbered from 1."""
    with _open(path) as stream:
        yield from (_csv(stream) if _is_csv(path) else _ndjson(stream))


def count_lines(path: Path) -> int:
    """Lines in the file (one pass; for the progress bar's total and ETA)."""
    with _open(path) as stream:
        return sum(1 for _ in stream)


def _load_checkpoint(path: Path) -> int:
    """Lines already settled, or 0 when there is no checkpoint or it is of another file."""
    try:
        saved = json.loads(checkpoint_path(path).read_text())
    except (OSError, ValueError):
        return 0
    if saved.get("size") != path.stat().st_size:
        print(
            f"millimetric backfill: {path} changed since its checkpoint: from the start",
            file=sys.stderr,
        )
        return 0
    return int(saved.get("lines", 0))


def _save_checkpoint(path: Path, lines: int) -> None:
    target = checkpoint_path(path)
    temp = target.with_name(target.name + ".tmp")
    temp.write_text(json.dumps({"lines": lines, "size": path.stat().st_size}))
    os.replace(temp, target)  # a kill mid-write leaves the previous checkpoint whole


class Backfill:
    """Sends files through one connection to the gateway."""

    def __init__(self, host: str, key: str, batch_size: int, byte_cap: int) -> None:
        self.transport = Transport(host, key, 60.0, {HISTORICAL_HEADER: "historical"})
        self.batch_size = batch_size
        self.byte_cap = byte_cap

    def close(self) -> None:
        """Drop the connection."""
        self.transport.close()

    def run(self, path: Path) -> Summary:
        """Send one file from its checkpoint on; return what happened to its lines."""
        summary = Summary(path)
        done = _load_checkpoint(path)
        summary.skipped = done
        progress = Progress(path.name, count_lines(path), done)
        try:
            batch: list[Line] = []
            for line in read_lines(path):
                if line.number <= done:
                    continue
                batch.append(line)
                if len(batch) >= self.batch_size:
                    self._settle(path, batch, summary, progress)
                    batch = []
            if batch:
                self._settle(path, batch, summary, progress)
        finally:
            progress.close()
        return summary

    def _settle(self, path: Path, batch: list[Line], summary: Summary, progress: Progress) -> None:
        """Send a batch's events; write its refused lines; then move the checkpoint past it."""
        refused: dict[int, tuple[str, str]] = {
            line.number: (line.error, line.message) for line in batch if line.error
        }
        by_body: dict[int, Line] = {}
        messages: list[Message] = []
        for line in batch:
            if line.event is not None:
                by_body[id(line.event)] = line
                messages.append(("batch", line.event, None))
        fatal: list[str] = []

        def report(reason: str, message: str, failed: list[Message]) -> None:
            if reason not in LINE_REJECTS:
                fatal.append(f"{reason}: {message}")
                return
            for _, body, _future in failed:
                refused[by_body[id(body)].number] = (reason, message)

        if messages:
            delivery = Delivery(
                self.transport, self.byte_cap, lambda n: None, report, threading.Event()
            )
            delivery.deliver(messages)
            for cause, count in delivery.retries.items():
                summary.retries[cause] = summary.retries.get(cause, 0) + count
        if fatal:
            raise BackfillAborted(f"{path}: the gateway refused a batch: {fatal[0]}")
        if refused:  # written before the checkpoint moves: a kill in between writes them twice
            with rejects_path(path).open("a", encoding="utf-8") as rejects:
                for line in batch:
                    if line.number in refused:
                        error, message = refused[line.number]
                        entry = {"line": line.number, "error": error, "message": message}
                        rejects.write(json.dumps(entry | {"text": line.text}) + "\n")
        summary.rejected += len(refused)
        summary.accepted += sum(1 for n in by_body.values() if n.number not in refused)
        summary.lines += len(batch)
        _save_checkpoint(path, batch[-1].number)
        progress.advance(len(batch))


def run(host: str, key: str, paths: list[Path], batch_size: int, byte_cap: int) -> int:
    """The command: send every file; print a summary per file. Exit 0 when nothing was rejected,
    1 when some lines were (they are in the rejects files), 2 when a run was aborted."""
    backfill = Backfill(host, key, batch_size, byte_cap)
    status = 0
    try:
        for path in paths:
            try:
                summary = backfill.run(path)
            except BackfillAborted as error:
                print(f"millimetric backfill: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(
                    f"millimetric backfill: interrupted; run it again to resume {path}",
                    file=sys.stderr,
                )
                return 130
            print(summary.text())
            if summary.rejected:
                status = 1
    finally:
        backfill.close()
    return status
