"""`millimetric dead-letters list|replay`: a row the sink dead-lettered while ClickHouse was
broken lands once when replayed after the fix, and a second replay sends nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.dead_letter_replay import Letter
from tests.services import Pipeline
from tests.test_sinks import dead_letters, enriched, produce, wait_counts


@pytest.fixture
def sink(fresh_broker: str, data_dir: Path) -> Iterator[Pipeline]:
    env = {"MILLIMETRIC_SINK_INSERT_ATTEMPTS": "1", "MILLIMETRIC_SINK_RETRY_MAX_S": "0.5"}
    p = Pipeline(fresh_broker, None, data_dir, env).start("sink")
    try:
        yield p
    finally:
        p.stop()


def command(p: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `millimetric dead-letters ...` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", "dead-letters", *args],
        env=p.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dead_lettered_row_replayed_after_the_fix_lands_once(sink: Pipeline) -> None:
    produce(sink.bootstrap, [enriched(i) for i in range(10)])
    wait_counts(sink, 10)
    sink.sql(
        "ALTER TABLE events DROP COLUMN referrer", write=True
    )  # the breakage an operator will fix
    produce(sink.bootstrap, [enriched(100)])
    assert len(dead_letters(sink.bootstrap, 1, timeout=120)) == 1
    sink.sql("ALTER TABLE events ADD COLUMN referrer String", write=True)  # the fix

    listed = command(sink, "list", "--reason", "clickhouse")
    assert listed.returncode == 0, listed.stderr
    [row] = listed.stdout.splitlines()[1:]
    assert row.split("\t")[1:5] == ["sink", "0:0", "e100", "no"]
    assert command(sink, "list", "--reason", "no such reason").stdout.count("\n") == 1

    replayed = command(sink, "replay", "--wait", "3")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "replayed 1, failed again 0" in replayed.stdout
    wait_counts(sink, 11)

    again = command(sink, "replay", "--wait", "0")
    assert "replayed 0, failed again 0, not replayable 0, skipped 1" in again.stdout
    produce(sink.bootstrap, [enriched(101)])  # behind anything a second replay could have sent
    wait_counts(sink, 12)
    assert sink.sql("SELECT count() FROM events WHERE event_id = 'e100'") == "1\n"
    assert "\tyes\t" in command(sink, "list").stdout


def test_each_letter_goes_back_to_the_topic_its_stage_reads() -> None:
    event = {"project": "p", "event_id": "e1", "anonymous_id": "a"}
    forget = {"project": "p", "forget_id": "fgt_1", "user_id": "u"}
    letters = {
        "raw": Letter(0, 1, 0, "processor", "enrich_failed: ValueError: x", event),
        "forgets": Letter(0, 2, 0, "processor", "forget_failed: KeyError: y", json.dumps(forget)),
        "enriched": Letter(0, 3, 0, "sink", "clickhouse refused: z", event),
    }
    for role, letter in letters.items():
        assert letter.target == (role, forget if role == "forgets" else event)
    assert letters["forgets"].event_id == "fgt_1" and letters["raw"].event_id == "e1"
    undecodable = Letter(0, 4, 0, "processor", "undecodable: not JSON", None)
    assert undecodable.target is None and undecodable.event_id == ""
    assert Letter(0, 5, 0, "sink", "undecodable: b'\\xff'", "\ufffd{").target is None
