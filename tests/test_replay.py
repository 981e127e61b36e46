"""`millimetric replay`: after a classifier rule change, a window of the raw topic is re-derived;
the new rows replace the old ones in that window only, every count stays exact, a forgotten
person stays forgotten, and the same raw records always give the same rows."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from ingest.records import decode, encode, envelope
from ingest.settings import Settings
from processors.classify import Classifier
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.replay import IDENTITIES_CHANGELOG, Replayer, Window, _seed_identities
from processors.useragent import UserAgentParser
from sinks.clickhouse import ClickHouse
from sinks.migrate import migrate
from sinks.rollup_rebuild import rebuild
from tests.services import Pipeline
from tests.test_end_to_end import PROJECT_RULES
from tests.test_enrich import raw
from tests.test_identity_forget import forget_status
from tests.test_migrations import ch as fresh_ch

NEWSLETTER = "https://s.example/?utm_source=newsletter"
# Every table as exact as FINAL and the -Merge functions make it.
ROWS = (
    "SELECT event_id, anonymous_id, user_id, session_id, ip_hash, channel, source_rule_id "
    "FROM events FINAL ORDER BY event_id"
)
ROLLUP = (
    "SELECT channel, sum(c) FROM (SELECT channel, uniqExactMerge(events) AS c FROM daily_rollup "
    "GROUP BY project, day, event, source, medium, channel) GROUP BY channel ORDER BY channel"
)
EVENTS_BY_CHANNEL = "SELECT channel, count() FROM events FINAL GROUP BY channel ORDER BY channel"
ENTRY_CHANNELS = (
    "SELECT session_id, argMinMerge(entry_channel) FROM sessions GROUP BY session_id "
    "ORDER BY session_id"
)
FIRST_CHANNELS = (
    "SELECT session_id, argMin(channel, timestamp) FROM events FINAL GROUP BY session_id "
    "ORDER BY session_id"
)


@pytest.fixture
def pipeline(fresh_broker: str, data_dir: Path, tmp_path: Path) -> Iterator[Pipeline]:
    # A broker of its own: a replay reads the whole raw topic, and the sinks' group is shared.
    rules = tmp_path / "rules.toml"
    rules.write_text("")
    env = {
        "MILLIMETRIC_PROJECT_RULES_PATH": str(rules),
        "MILLIMETRIC_FORGET_GRACE_S": "1",
        "MILLIMETRIC_PROCESSOR_PRODUCER_MAX_BATCH_SIZE": "1",
    }
    p = Pipeline(fresh_broker, None, data_dir, env).start()
    yield p
    p.stop()


def track(p: Pipeline, anonymous_id: str, at: int, **fields: Any) -> None:
    moment = datetime.fromtimestamp(at, UTC).isoformat()
    body = {"event": "page", "anonymous_id": anonymous_id, "timestamp": moment, **fields}
    p.post_accepted("/v1/track", body)


def test_replay_after_a_rule_change_rederives_the_window_only(pipeline: Pipeline) -> None:
    p = pipeline
    now = int(time.time())
    track(p, "early", now - 60, url=NEWSLETTER)
    track(p, "early", now - 50, url=NEWSLETTER)
    p.wait_for("SELECT count() FROM events", "2\n")
    since = datetime.now(UTC).isoformat()
    time.sleep(1.1)  # the broker's record times are milliseconds: well past `since`
    p.post_accepted("/v1/identify", {"anonymous_id": "late", "user_id": "ann", "traits": {}})
    track(p, "late", now - 40, url=NEWSLETTER)  # stitched to ann, from the identify above
    track(p, "late", now - 30, url=NEWSLETTER)
    p.post_accepted("/v1/identify", {"anonymous_id": "gone", "user_id": "fay", "traits": {}})
    track(p, "gone", now - 20, url=NEWSLETTER)
    p.wait_for("SELECT count() FROM events", "7\n")
    forget_id = p.post_accepted("/v1/forget", {"user_id": "fay"}).json()["forget_id"]
    assert forget_status(p, forget_id)["status"] == "done"
    before = p.sql(ROWS)
    # A forget leaves daily_rollup's counts (README, Forget): fay's two still count there.
    assert p.counts() == (5, 7, 5) and "Email" not in before

    Path(p.env["MILLIMETRIC_PROJECT_RULES_PATH"]).write_text(PROJECT_RULES)  # the fix
    out = subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", "replay", "--since", since, "--wait", "120"],
        env=p.env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert "replayed 5 events" in out.stdout  # fay's two as well: the sink drops them

    after = p.sql(ROWS)
    changed = {line.split("\t")[1] for line in set(after.splitlines()) - set(before.splitlines())}
    assert changed == {"late"}  # the window's tracks only; the early ones keep their channel
    assert p.sql("SELECT channel, source_rule_id FROM events FINAL WHERE anonymous_id = 'late' "
                 "AND event = 'page'") == "Email\tdemo.newsletter\n" * 2  # fmt: skip
    # Everything else re-derived alike: ids, stitching (ann), sessions, ip_hash.
    for old, new in zip(before.splitlines(), after.splitlines(), strict=True):
        assert old.split("\t")[:5] == new.split("\t")[:5]
    assert "ann" in after and "fay" not in after and "gone" not in after
    # Not one event more or less; the window's days of daily_rollup are rebuilt from events, so
    # there they count what events holds (fay's two no longer).
    assert p.counts() == (5, 5, 5)
    assert p.sql(ROLLUP) == p.sql(EVENTS_BY_CHANNEL)
    assert p.sql(ENTRY_CHANNELS) == p.sql(FIRST_CHANNELS)
    forgotten = "SELECT count() FROM {} WHERE user_id = 'fay' OR anonymous_id = 'gone'"
    assert p.sql(forgotten.format("events")) == "0\n"
    assert p.sql(forgotten.format("identities")) == "0\n"


def test_the_same_raw_records_give_the_same_rows_and_no_identity_link() -> None:
    settings = Settings(ip_salt="salt")
    window = Window(0, None, "demo")
    records = [
        (b"demo:a", encode(raw(type="identify", event_id="i", anonymous_id="a", user_id="u"))),
        (b"demo:x", b"not json"),  # dead-lettered live: fails again, the rest flows on
        (b"demo:a", encode(raw(event_id="t1", anonymous_id="a"))),
        (b"demo:a", encode({"v": 1, "type": "forget", "project": "demo", "anonymous_id": "a"})),
        (b"demo:a", encode(raw(event_id="t2", anonymous_id="a"))),
        (b"other:b", encode(raw(project="other", event_id="o", anonymous_id="b"))),
    ]

    def derive(version: int) -> list[dict[str, Any]]:
        enricher = Enricher(b"salt", 30, Classifier(), UserAgentParser(), CountryLookup(None))
        replayer = Replayer(enricher, settings, window, version)
        rows = [decode(value) for _, value in replayer.step(records)]
        assert replayer.outcome.failed == 1
        return rows

    first, second = derive(1), derive(2)
    assert [r.pop("version") for r in first] == [1, 1, 1]
    assert [r.pop("version") for r in second] == [2, 2, 2]
    assert first == second
    # Stitched while linked, not after the forget; the other project is not replayed.
    assert [(r["event_id"], r["user_id"]) for r in first] == [("i", "u"), ("t1", "u"), ("t2", "")]


def test_an_envelopes_events_are_stitched_each_by_its_own_visitor() -> None:
    # The gateway groups a request's events by partition, not by visitor: an envelope keyed by
    # visitor a may carry b's identify, which must stitch b (and not a).
    settings = Settings(ip_salt="salt")
    enricher = Enricher(b"salt", 30, Classifier(), UserAgentParser(), CountryLookup(None))
    replayer = Replayer(enricher, settings, Window(0, None, "demo"), 1)
    value = envelope(
        [
            encode(raw(event_id="a1", anonymous_id="a")),
            encode(raw(type="identify", event_id="b1", anonymous_id="b", user_id="u2")),
            encode(raw(event_id="b2", anonymous_id="b")),
            encode(raw(event_id="a2", anonymous_id="a")),
        ]
    )
    out = replayer.step([(b"demo:a", value)])
    rows = [(key, decode(v)) for key, v in out]
    assert [(r["event_id"], r["user_id"]) for _, r in rows] == [
        ("a1", ""), ("b1", "u2"), ("b2", "u2"), ("a2", "")
    ]  # fmt: skip
    assert [key for key, _ in rows] == [b"demo:a", b"demo:b", b"demo:b", b"demo:a"]


ch = fresh_ch  # the fixture: a fresh database, on chdb and on the 18.16 server


def test_a_rebuild_counts_a_replaced_row_once(ch: ClickHouse) -> None:
    migrate(ch)
    insert = (
        "INSERT INTO events (project, event_id, event, timestamp, received_at, session_id, "
        "channel, version) SELECT 'p', '{}', 'e', toDateTime('2026-01-02 0{}:00:00', 'UTC'), "
        "now(), 's', '{}', {}"
    )
    ch.execute(insert.format("a", 1, "Referral", 0))
    ch.execute(insert.format("b", 2, "Referral", 0))
    ch.execute(insert.format("a", 1, "Email", 5))  # a replayed row: another channel
    rollup = "SELECT channel, uniqExactMerge(events) FROM daily_rollup GROUP BY channel ORDER BY 1"
    entry = "SELECT argMinMerge(entry_channel), uniqExactMerge(events) FROM sessions"
    assert ch.query_tsv(rollup) == "Email\t1\nReferral\t2\n"  # the view counted `a` twice
    rebuild(ch, "p", {"2026-01-02"})
    assert ch.query_tsv(rollup) == "Email\t1\nReferral\t1\n"
    assert ch.query_tsv(entry) == "Email\t2\n"


def test_under_a_namespace_replay_seeds_from_that_namespaces_changelog(
    broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MILLIMETRIC_KAFKA_NAMESPACE prefixes the processor's app id, so its changelog too.
    namespace = f"ns{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MILLIMETRIC_KAFKA_NAMESPACE", namespace)
    changelog = f"{namespace}.{IDENTITIES_CHANGELOG}"

    async def seeded() -> dict[bytes, str]:
        producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(changelog, b"u2", key=b"demo:b", timestamp_ms=1000)
        finally:
            await producer.stop()
        settings = Settings(ip_salt="salt")
        enricher = Enricher(b"salt", 30, Classifier(), UserAgentParser(), CountryLookup(None))
        replayer = Replayer(enricher, settings, Window(2000, None, "demo"), 1)
        await _seed_identities(replayer, broker, settings, Window(2000, None, "demo"))
        return replayer.identities

    assert asyncio.run(seeded()) == {b"demo:b": "u2"}
