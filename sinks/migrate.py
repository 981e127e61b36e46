"""Schema migrations: numbered SQL files, applied once each, in order, recorded in ClickHouse.

Files are templates: `$NAME` placeholders take the type or clause the server version supports
(the table below), so one migration serves current ClickHouse and the Debian 18.16 server.
Every statement is idempotent (IF NOT EXISTS; 0005's create, rename and copy are skipped once
done: `_ALREADY_DONE`), so a migration interrupted half-way is re-run. Sinks starting together
on a fresh database race (one's ALTER finds the column the other added): the loser tries again
after a jittered pause, and by then reads the winner's ledger; a view that the loser's 0005
dropped after the winner made it again is made again at the end of every pass.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from string import Template

from tenacity import Retrying, before_sleep_log, stop_after_attempt, wait_random_exponential

from sinks.clickhouse import ClickHouse, Features
from sinks.cluster import LOCAL, statements_for

log = logging.getLogger(__name__)

MIGRATE_ATTEMPTS = 6  # ~15 s of pauses at most: a concurrent sink's migrations finish by then

# 0005's steps that a run interrupted (or a concurrent sink) may have done already, each skipped
# when its query counts more than zero; every other statement is idempotent as written.
_EVENTS_VERSIONED = (
    "SELECT count() FROM system.columns WHERE database = currentDatabase() "
    "AND table IN ('events', 'events{local}') AND name = 'version'"
)
_ALREADY_DONE: tuple[tuple[re.Pattern[str], str], ...] = (
    # The new table exists as `events` already: on a cluster its replica path is taken too.
    (re.compile(r"CREATE TABLE IF NOT EXISTS events_versioned\b"), _EVENTS_VERSIONED),
    (re.compile(r"RENAME TABLE events TO events_unversioned\b"), _EVENTS_VERSIONED),
    # The copy's source is dropped once it is done: no source, nothing left to copy.
    (
        re.compile(r"INSERT INTO events SELECT .* FROM events_unversioned$", re.S),
        "SELECT count() = 0 FROM system.tables WHERE database = currentDatabase() "
        "AND name IN ('events_unversioned', 'events_unversioned{local}')",
    ),
)
_VIEW = re.compile(
    r"CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\s+TO\s+(\w+)\s+AS\s+(SELECT\s.*)", re.S
)
_DROP = re.compile(r"DROP TABLE IF EXISTS (\w+)$")

LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
    "ENGINE = ReplacingMergeTree ORDER BY version"
)


def placeholders(features: Features) -> dict[str, str]:
    """What each template placeholder becomes on this server."""
    modern_time = features.has("datetime64")
    return {
        "LC_STRING": "LowCardinality(String)" if features.has("low_cardinality") else "String",
        "TIME": "DateTime64(3, 'UTC')" if modern_time else "DateTime('UTC')",
        # Without DateTime64 the milliseconds go to their own columns: degraded, not lost.
        "TIME_MS_COLUMNS": ""
        if modern_time
        else ",\n    timestamp_ms UInt16,\n    received_at_ms UInt16",
        "ZSTD": " CODEC(ZSTD(3))" if features.has("codecs") else "",
    }


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, template text) of every migration shipped, in order."""
    folder = resources.files("sinks") / "migrations"
    found = []
    for entry in folder.iterdir():
        if match := re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name):
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


def statements(template: str, features: Features) -> list[str]:
    """The statements of one migration, rendered for this server."""
    body = "\n".join(line for line in template.splitlines() if not line.lstrip().startswith("--"))
    sql = Template(body).substitute(placeholders(features))  # a literal $ is written $$
    return [s.strip() for s in sql.split(";") if s.strip()]


def backfill(statement: str) -> str | None:
    """For a statement creating a materialized view, the INSERT that gives its table what the
    source table held before the view existed (rows inserted since are taken twice: every view's
    states are sets or extrema, so that changes nothing). Columns go by position: each view
    selects its table's columns in order (tests/test_migrations.py checks)."""
    if match := _VIEW.fullmatch(statement):
        return f"INSERT INTO {match[2]} {match[3]}"
    return None


def views(features: Features) -> dict[str, str]:
    """Each materialized view the shipped migrations leave in place: name -> its last CREATE."""
    found: dict[str, str] = {}
    for _, _, template in migrations():
        for statement in statements(template, features):
            if match := _VIEW.fullmatch(statement):
                found[match[1]] = statement
            elif match := _DROP.fullmatch(statement):
                found.pop(match[1], None)
    return found


def migrate(ch: ClickHouse, attempts: int = MIGRATE_ATTEMPTS) -> list[int]:
    """Apply every migration not applied yet; return the versions applied now. On a cluster,
    every statement runs in its cluster form (sinks/cluster.py), the ledger included. A failure
    is tried again `attempts` times in all (another sink may be migrating), then raised."""
    applied: list[int] = []
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.5, max=5),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            _apply(ch, applied)
    return applied


def _apply(ch: ClickHouse, applied: list[int]) -> None:
    """One pass of `migrate`, appending each version applied to `applied`."""
    for statement in statements_for(ch, LEDGER):
        ch.execute(statement)
    done = {int(v) for v in ch.query_tsv("SELECT version FROM schema_migrations").split()}
    for version, name, template in migrations():
        if version in done:
            continue
        for statement in statements(template, ch.features):
            if _done_before(ch, statement):
                continue
            fill = backfill(statement)
            for form in statements_for(ch, statement) + (statements_for(ch, fill) if fill else []):
                ch.execute(form)
        # Data goes as columns: old servers hang on inline VALUES sent through the native driver.
        ch.insert_columns(
            "schema_migrations", ["version", "name"], [[version], [name]], ["version", "name"]
        )
        log.info("applied migration %04d_%s", version, name)
        applied.append(version)
    _restore_views(ch)


def _restore_views(ch: ClickHouse) -> None:
    """Make again, and fill from `events`, each view a concurrent or killed sink's 0005 dropped
    after this one's was done (its ledger says applied: nobody would make the view again, and
    every aggregate would stop). Filling twice changes nothing: states are sets or extrema."""
    tables = set(
        ch.query_tsv("SELECT name FROM system.tables WHERE database = currentDatabase()").split()
    )
    for name, statement in views(ch.features).items():
        if name in tables or f"{name}{LOCAL}" in tables:
            continue
        log.warning("materialized view %s was missing: made again and filled from events", name)
        fill = backfill(statement)
        assert fill is not None
        for form in statements_for(ch, statement) + statements_for(ch, fill):
            ch.execute(form)


def _done_before(ch: ClickHouse, statement: str) -> bool:
    """Whether `statement` is a step an interrupted or concurrent run did already."""
    for pattern, query in _ALREADY_DONE:
        if pattern.match(statement):
            return int(ch.query_tsv(query.format(local=LOCAL)).strip() or 0) > 0
    return False


def apply_retention(ch: ClickHouse, days: int | None) -> str:
    """Set (or clear) the events TTL; returns what was done, for the start-up log."""
    if days is None:
        return "retention: events are kept until deleted"
    if not ch.features.has("ttl"):
        return (
            f"retention: this server has no TTL; drop old partitions of events yourself "
            f"(wanted {days} days)"
        )
    ttl = f"ALTER TABLE events MODIFY TTL toDateTime(timestamp) + INTERVAL {int(days)} DAY"
    for statement in statements_for(ch, ttl):
        ch.execute(statement)
    return f"retention: events older than {days} days are dropped (TTL)"
