"""The schema on a replicated ClickHouse cluster (MILLIMETRIC_CLICKHOUSE_CLUSTER), for real:
ZooKeeper and two 18.16 servers as one shard of two replicas; the sink writes through the
Distributed tables while one replica is stopped and restarted; a delete reaches both."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.services import ClickHouseServer, Proc, stage
from ingest.records import Erasure
from sinks.clickhouse import Features, ServerClickHouse
from sinks.cluster import cluster_statements, pending_mutations
from sinks.erasure_audit import ForgetAudit
from sinks.erasure_executor import ErasureExecutor
from sinks.migrate import LEDGER, backfill, migrations, statements
from sinks.rollup_rebuild import rebuild
from tests.clickhouse_cluster import CLUSTER, clickhouse_cluster
from tests.services import stage_env
from tests.test_sinks import enriched, produce

DATABASE = "analytics"
EVENTS = 3000


@pytest.mark.parametrize("version", [(18, 16), (25, 8)])
def test_every_migration_statement_has_a_cluster_form(version: tuple[int, int]) -> None:
    features = Features(version)
    rendered = [LEDGER] + [s for _, _, t in migrations() for s in statements(t, features)]
    for sql in rendered:
        forms = cluster_statements(sql, "c", "db")
        if (fill := backfill(sql)) is not None:  # once, through the Distributed tables
            (form,) = cluster_statements(fill, "c", "db")
            assert form.startswith("INSERT INTO db.") and "\nFROM db.events\n" in form, form
        # A copy runs once, through the Distributed tables; everything else on every replica.
        assert all(
            " ON CLUSTER c " in f"{form} " or form.startswith("INSERT INTO ") for form in forms
        ), sql
    events = cluster_statements(rendered[1], "c", "db")
    assert events[0].startswith("CREATE TABLE IF NOT EXISTS db.events_local ON CLUSTER c (")
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/events_local', "
        "'{replica}')\nPARTITION BY toYYYYMM(timestamp)" in events[0]
    )
    assert events[1].endswith(
        "ENGINE = Distributed(c, db, events_local, cityHash64(project, anonymous_id))"
    )
    with pytest.raises(ValueError):
        cluster_statements("DROP TABLE events", "c", "db")


def test_a_rename_renames_the_local_tables_and_recreates_the_distributed_ones() -> None:
    assert cluster_statements("RENAME TABLE events TO old, new TO events", "c", "db") == [
        "RENAME TABLE db.events_local TO db.old_local, db.new_local TO db.events_local "
        "ON CLUSTER c",
        "DROP TABLE IF EXISTS db.events ON CLUSTER c",
        "DROP TABLE IF EXISTS db.new ON CLUSTER c",
        "CREATE TABLE IF NOT EXISTS db.old ON CLUSTER c AS db.old_local "
        "ENGINE = Distributed(c, db, old_local, rand())",
        "CREATE TABLE IF NOT EXISTS db.events ON CLUSTER c AS db.events_local "
        "ENGINE = Distributed(c, db, events_local, cityHash64(project, anonymous_id))",
    ]
    assert cluster_statements("DROP TABLE IF EXISTS daily_rollup_mv", "c", "db") == [
        "DROP TABLE IF EXISTS db.daily_rollup_mv ON CLUSTER c",
        "DROP TABLE IF EXISTS db.daily_rollup_mv_local ON CLUSTER c",
    ]


def test_mutations_become_cluster_mutations_on_the_local_tables() -> None:
    assert cluster_statements("ALTER TABLE events DELETE WHERE project = 'p'", "c", "db") == [
        "ALTER TABLE db.events_local ON CLUSTER c DELETE WHERE project = 'p'"
    ]
    assert cluster_statements("DELETE FROM events WHERE user_id = 'u'", "c", "db") == [
        "DELETE FROM db.events_local ON CLUSTER c WHERE user_id = 'u'"
    ]
    assert cluster_statements(
        "ALTER TABLE events ADD COLUMN IF NOT EXISTS x String", "c", "db"
    ) == [
        "ALTER TABLE db.events_local ON CLUSTER c ADD COLUMN IF NOT EXISTS x String",
        "DROP TABLE IF EXISTS db.events ON CLUSTER c",
        "CREATE TABLE IF NOT EXISTS db.events ON CLUSTER c AS db.events_local "
        "ENGINE = Distributed(c, db, events_local, cityHash64(project, anonymous_id))",
    ]


def _wait(what: Callable[[], object], expected: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = what()
        except Exception as error:  # a replica still starting or catching up
            last = error
        if last == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"got {last!r}, expected {expected!r}")


def _on(server: ClickHouseServer, sql: str) -> str:
    ch = ServerClickHouse(server.url(DATABASE))
    try:
        return ch.query_tsv(sql)
    finally:
        ch.close()


def _counts(server: ClickHouseServer) -> str:
    """Distinct events as this replica's own tables count them: events, rollup, sessions."""
    return _on(
        server,
        "SELECT (SELECT count() FROM events_local FINAL), "
        "(SELECT sum(c) FROM (SELECT uniqExactMerge(events) AS c FROM daily_rollup_local "
        " GROUP BY project, day, event, source, medium, channel)), "
        "(SELECT sum(c) FROM (SELECT uniqExactMerge(events) AS c FROM sessions_local "
        " GROUP BY project, session_id))",
    )


def forget_of(anonymous_id: str) -> Erasure:
    """A forget of one device of the `demo` project, received now."""
    now = int(time.time() * 1000)
    return {
        "v": 1,
        "forget_id": f"fgt_{anonymous_id}",
        "project": "demo",
        "user_id": None,
        "anonymous_ids": [anonymous_id],
        "cutoff": now,
        "suppress": False,
        "requested_at": now,
    }


def _sink(bootstrap: str, server: ClickHouseServer, data_dir: Path) -> Proc:
    """A sink writing to the cluster through `server`, in small batches (many inserts)."""
    env = {
        "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
        "MILLIMETRIC_CLICKHOUSE_URL": server.url(DATABASE),
        "MILLIMETRIC_CLICKHOUSE_CLUSTER": CLUSTER,
        "MILLIMETRIC_FORGET_AUDIT_KEY": "test-audit-key",
        "MILLIMETRIC_SINK_BATCH_ROWS": "250",
        "MILLIMETRIC_SINK_BATCH_SECONDS": "0.2",
        "MILLIMETRIC_DATA_DIR": str(data_dir),
        "MILLIMETRIC_LOG_LEVEL": "WARNING",
    }
    return stage("sink", stage_env(env), data_dir)


def test_sink_writes_through_the_cluster_while_a_replica_restarts(
    fresh_broker: str, tmp_path: Path
) -> None:
    with clickhouse_cluster() as cluster:
        writer, other = cluster.replicas
        sink = _sink(fresh_broker, writer, tmp_path).start()
        try:
            half = EVENTS // 2
            produce(fresh_broker, [enriched(i) for i in range(half)])
            _wait(lambda: _counts(other), f"{half}\t{half}\t{half}\n")
            other.stop()  # mid-run: the Distributed inserts fail over to the writer
            produce(fresh_broker, [enriched(i) for i in range(half, EVENTS)])
            _wait(lambda: _on(writer, "SELECT count() FROM events FINAL"), f"{EVENTS}\n")
            other.start()  # it fetches what it missed from the replication log
            for replica in cluster.replicas:
                _wait(lambda r=replica: _counts(r), f"{EVENTS}\t{EVENTS}\t{EVENTS}\n")
        finally:
            sink.stop()

        # A forget, as the sink's executor runs it, reaches every replica.
        ch = ServerClickHouse(writer.url(DATABASE), CLUSTER)
        try:
            person = "project = 'demo' AND anonymous_id = 'a3'"
            erased = int(ch.query_tsv(f"SELECT count() FROM events WHERE {person}"))
            assert erased == EVENTS // 10
            executor = ErasureExecutor(
                ch, ForgetAudit(ch, b"audit-key"), grace_s=0, mutation_timeout_s=60
            )
            [status] = executor.execute([forget_of("a3")], sleep=lambda _: None)
            assert status["status"] == "done"
            assert pending_mutations(ch) == 0
        finally:
            ch.close()
        for replica in cluster.replicas:
            left = _on(replica, f"SELECT count() FROM events_local WHERE {person}")
            assert left == "0\n"
            assert _on(replica, "SELECT count() FROM events_local") == f"{EVENTS - erased}\n"


def test_two_shards_keep_a_repeated_event_on_one_shard(fresh_broker: str, tmp_path: Path) -> None:
    """Rows spread over both shards; a redelivered batch lands beside its first copies (the
    sharding key is a function of the row), so FINAL still counts each event once."""
    with clickhouse_cluster(shards=2, replicas=1) as cluster:
        first, second = cluster.replicas
        sink = _sink(fresh_broker, first, tmp_path).start()
        try:
            records = [enriched(i) for i in range(1000)]
            produce(fresh_broker, records)
            _wait(lambda: _on(first, "SELECT count() FROM events FINAL"), "1000\n")
            produce(fresh_broker, records[200:700])  # redelivered, as after a crash
            # One new event behind the repeats on each partition: once all have landed, so have
            # the repeats, and a repeat on the other shard than its first copy would count twice.
            produce(fresh_broker, [enriched(i) for i in range(1000, 1012)])
            _wait(lambda: _on(second, "SELECT count() FROM events FINAL"), "1012\n")
        finally:
            sink.stop()
        shards = [int(_on(s, "SELECT count() FROM events_local FINAL")) for s in cluster.replicas]
        assert all(shards) and sum(shards) == 1012
        assert int(_on(first, "SELECT count() FROM events WHERE event_id = 'e1011'")) == 1

        # A replayed row (a higher version, another channel) replaces its first copy, and the
        # rebuild of its day counts it once, in its new group only.
        ch = ServerClickHouse(first.url(DATABASE), CLUSTER)
        try:
            columns = "project, event_id, event, timestamp, received_at, anonymous_id, session_id"
            ch.execute(
                f"INSERT INTO events ({columns}, channel, version) "
                f"SELECT {columns}, 'Email', 9 FROM events WHERE event_id = 'e7'"
            )
            day = ch.query_tsv(
                "SELECT toString(toDate(timestamp)) FROM events WHERE event_id = 'e7'"
            )
            rebuild(ch, "demo", {day.split()[0]})
            rollup = (
                "SELECT channel, sum(c) FROM (SELECT channel, uniqExactMerge(events) AS c "
                "FROM daily_rollup GROUP BY project, day, event, source, medium, channel) "
                "GROUP BY channel ORDER BY channel"
            )
            by_channel = (
                "SELECT channel, count() FROM events FINAL GROUP BY channel ORDER BY channel"
            )
            assert ch.query_tsv(rollup) == ch.query_tsv(by_channel)
            assert "Email\t1\n" in ch.query_tsv(rollup)
        finally:
            ch.close()
