"""The migrations ledger and retention, on embedded chdb and on the 18.16 server: a re-run is a
no-op, a new file applies once, an interrupted migration resumes; MILLIMETRIC_RETENTION_DAYS
drops old events (where the server has TTL) and keeps the aggregates."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sinks import migrate as migrate_module
from sinks.clickhouse import ClickHouse, EmbeddedClickHouse, ServerClickHouse
from sinks.migrate import apply_retention, backfill, migrate, migrations, statements

SHIPPED = [version for version, _, _ in migrations()]


@pytest.fixture(params=["chdb", "server"])
def ch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClickHouse]:
    """A fresh, empty database."""
    if request.param == "server":
        client: ClickHouse = ServerClickHouse(request.getfixturevalue("ch_url"))
    else:
        client = EmbeddedClickHouse(tmp_path / "clickhouse")
    yield client
    client.close()


def ledger(ch: ClickHouse) -> str:
    return ch.query_tsv("SELECT version FROM schema_migrations FINAL ORDER BY version")


def test_sinks_migrating_a_fresh_database_together_both_start(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Two sinks started at once on a fresh server database: one's ALTER used to find the
    # column the other had just added, and that sink died.
    url = request.getfixturevalue("ch_url")
    clients = [ServerClickHouse(url) for _ in range(3)]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            results = list(pool.map(migrate, clients))
        assert {v for applied in results for v in applied} == set(SHIPPED)
        assert ledger(clients[0]).split() == [str(v) for v in SHIPPED]
        assert migrate(clients[0]) == []
    finally:
        for client in clients:
            client.close()


def test_a_rerun_is_a_no_op_and_a_new_file_applies_once(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert migrate(ch) == SHIPPED
    assert migrate(ch) == []
    # Not idempotent on purpose: a second application would insert a second row.
    extra = (
        "CREATE TABLE IF NOT EXISTS extra (x UInt8) ENGINE = MergeTree ORDER BY x;\n"
        "INSERT INTO extra SELECT 1"
    )
    monkeypatch.setattr(
        migrate_module, "migrations", lambda: [*migrations(), (9001, "extra", extra)]
    )
    assert migrate(ch) == [9001]
    assert migrate(ch) == []
    assert ch.query_tsv("SELECT count() FROM extra") == "1\n"
    assert ledger(ch).split() == [str(v) for v in [*SHIPPED, 9001]]


def test_an_interrupted_migration_resumes(ch: ClickHouse, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(ch)
    # The second statement fails (its table is missing) after the first one ran.
    half = (
        "CREATE TABLE IF NOT EXISTS first_half (x UInt8) ENGINE = MergeTree ORDER BY x;\n"
        "INSERT INTO not_yet SELECT 1"
    )
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*migrations(), (9002, "half", half)])
    with pytest.raises(Exception, match="not_yet"):
        migrate(ch, attempts=1)
    assert "9002" not in ledger(ch).split()  # not recorded: the next start runs it again
    ch.execute("CREATE TABLE not_yet (x UInt8) ENGINE = MergeTree ORDER BY x")
    assert migrate(ch) == [9002]
    assert ch.query_tsv("SELECT count() FROM not_yet") == "1\n"


def test_retention_days_drops_old_events_and_keeps_the_aggregates(ch: ClickHouse) -> None:
    migrate(ch)
    for event_id, age_days in (("old", 60), ("new", 1)):
        ch.execute(
            "INSERT INTO events (project, event_id, event, timestamp, received_at) "
            f"SELECT 'p', '{event_id}', 'e', now() - {age_days * 86_400}, now()"
        )
    said = apply_retention(ch, 30)
    ch.execute("OPTIMIZE TABLE events FINAL")
    rollup = (
        "SELECT sum(c) FROM (SELECT uniqExactMerge(events) AS c FROM daily_rollup GROUP BY day)"
    )
    assert ch.query_tsv(rollup) == "2\n"  # aggregates are kept
    kept = ch.query_tsv("SELECT event_id FROM events ORDER BY event_id")
    if ch.features.has("ttl"):
        assert said == "retention: events older than 30 days are dropped (TTL)"
        assert kept == "new\n"
    else:  # the 18.16 server: said so at start, nothing dropped
        assert said.startswith("retention: this server has no TTL")
        assert kept == "new\nold\n"
    assert apply_retention(ch, None) == "retention: events are kept until deleted"


def test_event_versions_keep_the_rows_and_aggregates_and_resume_after_the_rename(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = migrations()
    before = [m for m in shipped if m[0] < 5]
    monkeypatch.setattr(migrate_module, "migrations", lambda: before)
    migrate(ch)
    insert = (
        "INSERT INTO events (project, event_id, event, timestamp, received_at, session_id, source) "
        "SELECT 'p', '{}', 'e', toDateTime('2026-01-02 03:04:05', 'UTC'), now(), 's', '{}'"
    )
    ch.execute(insert.format("old", "google"))
    # Interrupted just after the rename: the next start must neither rename again nor lose rows.
    versions = next(m for m in shipped if m[0] == 5)
    cut = versions[2].index("INSERT INTO events SELECT")
    broken = versions[2][:cut] + "INSERT INTO not_there SELECT 1"
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*before, (5, "cut", broken)])
    with pytest.raises(Exception, match="not_there"):
        migrate(ch, attempts=1)
    monkeypatch.setattr(migrate_module, "migrations", lambda: shipped)
    assert migrate(ch) == [v for v, _, _ in shipped if v >= 5]
    assert ch.query_tsv("SELECT event_id, version FROM events") == "old\t0\n"
    # The copy fed no aggregate twice; a replayed row (higher version) replaces the old one.
    ch.execute(insert.format("old", "bing").replace("source)", "source, version)") + ", 7")
    ch.execute(insert.format("old", "google"))  # the live row redelivered later: version 0
    assert ch.query_tsv("SELECT source, version FROM events FINAL") == "bing\t7\n"
    rollup = (
        "SELECT source, uniqExactMerge(events) FROM daily_rollup GROUP BY source ORDER BY source"
    )
    assert ch.query_tsv(rollup) == "bing\t1\ngoogle\t1\n"  # the views fire again
    tables = ch.query_tsv(
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND name LIKE 'events%'"
    )
    assert tables == "events\n"


def test_event_versions_interrupted_after_the_copy_keep_every_row(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cut after the old table was dropped, before the ledger: the rerun must not rename the
    # copied table away and put an empty one in its place.
    shipped = migrations()
    before = [m for m in shipped if m[0] < 5]
    monkeypatch.setattr(migrate_module, "migrations", lambda: before)
    migrate(ch)
    ch.execute(
        "INSERT INTO events (project, event_id, event, timestamp, received_at, session_id) "
        "SELECT 'p', 'kept', 'e', toDateTime('2026-01-02 03:04:05', 'UTC'), now(), 's'"
    )
    versions = next(m for m in shipped if m[0] == 5)
    cut = (*versions[:2], versions[2] + ";\nINSERT INTO not_there SELECT 1")
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*before, cut])
    with pytest.raises(Exception, match="not_there"):
        migrate(ch, attempts=1)
    monkeypatch.setattr(migrate_module, "migrations", lambda: shipped)
    assert migrate(ch) == [v for v, _, _ in shipped if v >= 5]
    assert ch.query_tsv("SELECT event_id, version FROM events FINAL") == "kept\t0\n"
    assert ch.query_tsv("SELECT count() FROM events") == "1\n"  # copied once


def test_a_new_view_gets_the_events_stored_before_it(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hourly_rollup (0006) on a store that already held events: its view sees only new
    # inserts, so migrate() fills it from them; a row both took counts once (sets).
    shipped = migrations()
    monkeypatch.setattr(migrate_module, "migrations", lambda: [m for m in shipped if m[0] < 6])
    migrate(ch)
    for n in range(3):
        ch.execute(
            "INSERT INTO events (project, event_id, event, timestamp, received_at, anonymous_id) "
            f"SELECT 'p', 'e{n}', 'page', now(), now(), 'v{n % 2}'"
        )
    monkeypatch.setattr(migrate_module, "migrations", lambda: shipped)
    assert 6 in migrate(ch)
    ch.execute(
        "INSERT INTO events (project, event_id, event, timestamp, received_at, anonymous_id) "
        "SELECT 'p', 'e0', 'page', now(), now(), 'v0'"  # redelivered after the migration
    )
    counts = "SELECT uniqExactMerge(events), uniqExactMerge(visitors) FROM hourly_rollup"
    assert ch.query_tsv(counts) == "3\t2\n"


def test_a_view_dropped_by_a_concurrent_sink_is_made_again_with_what_events_holds(
    ch: ClickHouse,
) -> None:
    # Two sinks on a fresh database: one's 0005 dropped the views after the other's had made
    # them again, and both ledgers said done; daily_rollup got nothing (CI: 6000 events, 0).
    migrate(ch)
    ch.execute("DROP TABLE daily_rollup_mv")
    ch.execute(
        "INSERT INTO events (project, event_id, event, timestamp, received_at, anonymous_id) "
        "SELECT 'p', 'e1', 'page', now(), now(), 'v1'"
    )
    assert migrate(ch) == []
    ch.execute(
        "INSERT INTO events (project, event_id, event, timestamp, received_at, anonymous_id) "
        "SELECT 'p', 'e2', 'page', now(), now(), 'v1'"
    )
    counts = "SELECT uniqExactMerge(events), uniqExactMerge(visitors) FROM daily_rollup"
    assert ch.query_tsv(counts) == "2\t1\n"


def test_every_view_selects_its_tables_columns_in_order(tmp_path: Path) -> None:
    # backfill() inserts a view's SELECT by position: a reordered column would misplace states.
    ch = EmbeddedClickHouse(tmp_path / "clickhouse")
    try:
        migrate(ch)
        for _, _, template in migrations():
            for statement in statements(template, ch.features):
                if (fill := backfill(statement)) is None:
                    continue
                table, select = fill.removeprefix("INSERT INTO ").split(" ", 1)
                described = ch.query_tsv(f"DESCRIBE TABLE ({select})").splitlines()
                names = "".join(line.split("\t")[0] + "\n" for line in described)
                columns = ch.query_tsv(
                    "SELECT name FROM system.columns WHERE database = currentDatabase() "
                    f"AND table = '{table}' ORDER BY position"
                )
                assert names == columns, table
    finally:
        ch.close()
