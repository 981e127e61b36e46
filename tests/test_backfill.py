"""`millimetric backfill` into a running pipeline: history lands with its timestamps, once, even
when sent twice or killed half way; bad lines are reported by number; the historical lane."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from gateway.rate_limit import limit_class
from ingest.backfill import checkpoint_path, read_lines, rejects_path
from tests.services import Pipeline

START_MS = 1_560_000_000_000  # 2019-06-08: years before "now", inside the 10-year window
STEP_MS = 3_600_000


@pytest.fixture
def pipeline(fresh_broker: str, data_dir: Path) -> Iterator[Pipeline]:
    p = Pipeline(fresh_broker, None, data_dir).start()
    try:
        yield p
    finally:
        p.stop()


def iso(millis: int) -> str:
    """ISO 8601 with milliseconds, UTC."""
    seconds, ms = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def history(path: Path, count: int) -> Path:
    """`count` events an hour apart from 2019 on, gzipped; every other one without an event_id."""
    with gzip.open(path, "wt") as out:
        for i in range(count):
            event = {"event": "imported", "anonymous_id": f"a{i % 97}", "path": f"/p{i % 13}"}
            event["timestamp"] = iso(START_MS + i * STEP_MS)
            if i % 2:
                event["event_id"] = f"old-{i}"
            out.write(json.dumps(event) + "\n")
    return path


def backfill(p: Pipeline, *args: str) -> subprocess.Popen[str]:
    """Start the command as a user would, key from MILLIMETRIC_KEY."""
    env = {**p.env, "MILLIMETRIC_KEY": p.key, "MILLIMETRIC_HOST": p.base_url}
    return subprocess.Popen(
        [sys.executable, "-m", "millimetric_app.cli", "backfill", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for the command; its exit status and summary line."""
    out, err = process.communicate(timeout=600)
    assert process.returncode in (0, 1), err
    return process.returncode, out


def settled(p: Pipeline, expected: int) -> None:
    """Wait until `expected` events are stored, then send a live marker and wait for it: once it
    is stored, nothing sent before it is still on its way (a duplicate would show by then)."""
    p.wait_for("SELECT count() FROM events FINAL WHERE event = 'imported'", f"{expected}\n", 300)
    assert p.post("/v1/track", {"event": "marker", "anonymous_id": "m"}).status_code == 202
    p.wait_for("SELECT count() FROM events FINAL WHERE event = 'marker'", "1\n", 120)


def stored_timestamps(p: Pipeline) -> tuple[int, int, int]:
    out = p.sql(
        "SELECT min(toUInt64(toDateTime(timestamp))), max(toUInt64(toDateTime(timestamp))), "
        "sum(toUInt64(toDateTime(timestamp)) % 86400) FROM events FINAL WHERE event = 'imported'"
    )
    low, high, total = (int(v) for v in out.split())
    return low, high, total


def check_history(p: Pipeline, count: int) -> None:
    """All `count` events stored once, each at its original second."""
    times = [(START_MS + i * STEP_MS) // 1000 for i in range(count)]
    assert stored_timestamps(p) == (min(times), max(times), sum(t % 86400 for t in times))


def run_history(p: Pipeline, tmp_path: Path, count: int) -> None:
    path = history(tmp_path / "history.ndjson.gz", count)
    status, out = finish(backfill(p, str(path)))
    assert status == 0 and f"{count} accepted, 0 rejected" in out, out
    settled(p, count)
    check_history(p, count)

    # Again: the checkpoint says the file is done, nothing is sent.
    status, out = finish(backfill(p, str(path)))
    assert f"0 accepted, 0 rejected (see {rejects_path(path)}), {count} already done" in out

    # Again without the checkpoint: every event is sent, and every id is one already stored.
    checkpoint_path(path).unlink()
    status, out = finish(backfill(p, str(path)))
    assert f"{count} accepted" in out
    p.post("/v1/track", {"event": "marker2", "anonymous_id": "m"})
    p.wait_for("SELECT count() FROM events FINAL WHERE event = 'marker2'", "1\n", 300)
    assert p.sql("SELECT count() FROM events FINAL WHERE event = 'imported'") == f"{count}\n"


def test_history_lands_once_with_its_timestamps(pipeline: Pipeline, tmp_path: Path) -> None:
    run_history(pipeline, tmp_path, 2_000)


@pytest.mark.slow
def test_fifty_thousand_historical_events(pipeline: Pipeline, tmp_path: Path) -> None:
    run_history(pipeline, tmp_path, 50_000)


def test_killed_half_way_resumes_with_exactly_the_rest(pipeline: Pipeline, tmp_path: Path) -> None:
    count = 2_000
    path = history(tmp_path / "history.ndjson.gz", count)
    process = backfill(pipeline, str(path), "--batch-size", "50")
    deadline = time.monotonic() + 300
    done = 0
    while done < count // 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
        if checkpoint_path(path).exists():
            done = json.loads(checkpoint_path(path).read_text())["lines"]
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    skipped = json.loads(checkpoint_path(path).read_text())["lines"]
    assert count // 2 <= skipped < count

    _, out = finish(backfill(pipeline, str(path), "--batch-size", "50"))
    assert f"{count - skipped} accepted, 0 rejected" in out and f"{skipped} already done" in out
    settled(pipeline, count)
    check_history(pipeline, count)


def test_bad_lines_are_reported_by_number(pipeline: Pipeline, tmp_path: Path) -> None:
    lines = [
        json.dumps({"event": "imported", "timestamp": iso(START_MS)}),
        "{not json",
        "",
        json.dumps({"properties": {"no": "event name"}}),
        json.dumps({"event": "imported", "timestamp": "1969-12-31T00:00:00Z"}),
        json.dumps({"event": "imported", "timestamp": iso(START_MS + STEP_MS)}),
        json.dumps({"event": "imported", "properties": {"blob": "x" * 1_100_000}}),
    ]
    path = tmp_path / "mixed.ndjson"
    path.write_text("\n".join(lines) + "\n")
    status, out = finish(backfill(pipeline, str(path)))
    assert status == 1 and "2 accepted, 4 rejected" in out, out
    rejects = [json.loads(line) for line in rejects_path(path).read_text().splitlines()]
    assert [(r["line"], r["error"]) for r in rejects] == [
        (2, "invalid_json"),
        (4, "invalid_payload"),
        (5, "invalid_payload"),
        (7, "payload_too_large"),  # alone over the body limit: the line's fault, not the run's
    ]
    assert "1970" in rejects[2]["message"] and rejects[1]["text"] == lines[3]
    settled(pipeline, 2)


def test_csv_and_zstd_files_read_as_events(tmp_path: Path) -> None:
    csv_path = tmp_path / "old.csv.zst"
    table = "event,timestamp,anonymous_id,properties.plan\nsignup,2020-01-01T00:00:00Z,a1,pro\n"
    csv_path.write_bytes(zstandard.ZstdCompressor().compress(table.encode()))
    [line] = list(read_lines(csv_path))
    assert line.number == 2 and line.event is not None
    event_id = line.event.pop("event_id")
    assert line.event == {
        "event": "signup",
        "timestamp": "2020-01-01T00:00:00Z",
        "anonymous_id": "a1",
        "properties": {"plan": "pro"},
    }
    assert [line.event["event_id"] for line in read_lines(csv_path)] == [event_id]


def test_the_historical_lane_is_a_bucket_of_its_own() -> None:
    lane = {"x-millimetric-lane": "historical"}
    assert limit_class("batch", lane, "sk") == "batch_historical"
    assert limit_class("batch", {}, "sk") == "batch"
    assert limit_class("batch", lane, "pk") == "batch"  # a browser cannot take the import budget
    assert limit_class("track", lane, "sk") == "track"
