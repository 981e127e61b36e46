"""The schema and its mutations on a ClickHouse cluster (`MILLIMETRIC_CLICKHOUSE_CLUSTER`).

Each table of the single-server schema becomes two: `<name>_local`, the Replicated form of its
engine on every replica of every shard (one ZooKeeper path per shard; `{shard}` and `{replica}`
come from each server's macros), and `<name>`, a Distributed table over them, which the sink
inserts into and queries read, so no other code changes a name. Materialized views exist on
every replica, reading the local events table into the local aggregate tables: an insert fires
them on the replica that took it, and replication carries their output to the others. DDL runs
`ON CLUSTER`; a delete runs on the local tables `ON CLUSTER`, and replication carries it to every
replica of each shard. Names are qualified with the database, since a server runs distributed
DDL in its own default database.
"""

from __future__ import annotations

import re

from sinks.clickhouse import ClickHouse

LOCAL = "_local"
ZOOKEEPER_PATH = "/clickhouse/tables/{shard}/%s/%s"
# The shard a row inserted through a Distributed table goes to: a function of the row, so a
# redelivered row lands beside its first copy (the Replacing tables collapse it) and one visitor's
# events (their sessions) stay on one shard.
SHARDING_KEYS: dict[str, str] = {
    "events": "cityHash64(project, anonymous_id)",
    "forget_audit": "cityHash64(forget_id)",
    "schema_migrations": "version",
}
# Tables only materialized views fill: nothing is inserted through their Distributed table.
VIEW_FED_SHARDING_KEY = "rand()"

_CREATE_TABLE = re.compile(
    r"CREATE TABLE IF NOT EXISTS (\w+)\s*\((.*)\)\s*ENGINE\s*=\s*(\w+)(?:\(([^)]*)\))?(.*)", re.S
)
_CREATE_VIEW = re.compile(
    r"CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\s+TO\s+(\w+)\s+AS\s+(SELECT\s.*?\sFROM\s+)"
    r"(\w+)(.*)",
    re.S,
)
_ALTER = re.compile(r"ALTER TABLE (\w+)\s+(.*)", re.S)
_DELETE = re.compile(r"DELETE FROM (\w+)\s+(WHERE\s.*)", re.S)
_DROP = re.compile(r"DROP TABLE IF EXISTS (\w+)")
_RENAME = re.compile(r"RENAME TABLE (\w+ TO \w+(?:\s*,\s*\w+ TO \w+)*)")
_PAIR = re.compile(r"(\w+) TO (\w+)")
_INSERT_SELECT = re.compile(r"INSERT INTO (\w+)\s+(SELECT\s.*?\sFROM\s+)(\w+)(.*)", re.S)
# Alterations of a table's columns, which the Distributed table must follow.
_COLUMNS = re.compile(r"(ADD|DROP|MODIFY|RENAME|COMMENT|CLEAR) COLUMN", re.I)


def cluster_statements(sql: str, cluster: str, database: str) -> list[str]:
    """The statements that do on every replica of `cluster` what `sql` does on one server.

    `sql` is one statement of the schema's forms: CREATE TABLE / MATERIALIZED VIEW IF NOT
    EXISTS, ALTER TABLE, DELETE FROM, DROP TABLE IF EXISTS, RENAME TABLE, INSERT INTO … SELECT;
    any other raises ValueError rather than run on one server.
    """
    on = f"ON CLUSTER {cluster}"
    if match := _CREATE_TABLE.fullmatch(sql.strip()):
        name, columns, engine, args, clauses = match.groups()
        local = f"{name}{LOCAL}"
        replicated = [f"'{ZOOKEEPER_PATH % (database, local)}'", "'{replica}'"]
        if args:
            replicated.append(args)
        sharding = SHARDING_KEYS.get(name, VIEW_FED_SHARDING_KEY)
        return [
            f"CREATE TABLE IF NOT EXISTS {database}.{local} {on} ({columns}) "
            f"ENGINE = Replicated{engine}({', '.join(replicated)}){clauses}",
            f"CREATE TABLE IF NOT EXISTS {database}.{name} {on} ({columns}) "
            f"ENGINE = Distributed({cluster}, {database}, {local}, {sharding})",
        ]
    if match := _CREATE_VIEW.fullmatch(sql.strip()):
        view, target, select, source, rest = match.groups()
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{view} {on} "
            f"TO {database}.{target}{LOCAL} AS {select}{database}.{source}{LOCAL}{rest}"
        ]
    if match := _ALTER.fullmatch(sql.strip()):
        table, change = match.groups()
        statements = [f"ALTER TABLE {database}.{table}{LOCAL} {on} {change}"]
        if _COLUMNS.match(change):
            # ALTER … ON CLUSTER refuses a Distributed table on a replicated cluster (it is not
            # replicated itself): recreate it over the altered local table instead.
            sharding = SHARDING_KEYS.get(table, VIEW_FED_SHARDING_KEY)
            statements += [
                f"DROP TABLE IF EXISTS {database}.{table} {on}",
                f"CREATE TABLE IF NOT EXISTS {database}.{table} {on} AS {database}.{table}{LOCAL} "
                f"ENGINE = Distributed({cluster}, {database}, {table}{LOCAL}, {sharding})",
            ]
        return statements
    if match := _DELETE.fullmatch(sql.strip()):
        table, where = match.groups()
        return [f"DELETE FROM {database}.{table}{LOCAL} {on} {where}"]
    if match := _DROP.fullmatch(sql.strip()):
        name = match[1]  # a view, or a table with its local tables
        return [
            f"DROP TABLE IF EXISTS {database}.{name} {on}",
            f"DROP TABLE IF EXISTS {database}.{name}{LOCAL} {on}",
        ]
    if match := _RENAME.fullmatch(sql.strip()):
        pairs = _PAIR.findall(match[1])
        renames = ", ".join(f"{database}.{a}{LOCAL} TO {database}.{b}{LOCAL}" for a, b in pairs)
        # A Distributed table names its local table: each one is recreated over its new local.
        statements = [f"RENAME TABLE {renames} {on}"]
        statements += [f"DROP TABLE IF EXISTS {database}.{a} {on}" for a, _ in pairs]
        statements += [
            f"CREATE TABLE IF NOT EXISTS {database}.{b} {on} AS {database}.{b}{LOCAL} "
            f"ENGINE = Distributed({cluster}, {database}, {b}{LOCAL}, "
            f"{SHARDING_KEYS.get(b, VIEW_FED_SHARDING_KEY)})"
            for _, b in pairs
        ]
        return statements
    if match := _INSERT_SELECT.fullmatch(sql.strip()):
        # Once, not ON CLUSTER: through the Distributed tables, every shard's rows are read and
        # the states land on some shard; reads merge states across shards, so sets stay exact.
        table, select, source, rest = match.groups()
        return [f"INSERT INTO {database}.{table} {select}{database}.{source}{rest}"]
    raise ValueError(f"no cluster form for this statement: {sql[:80]!r}")


def statements_for(ch: ClickHouse, sql: str) -> list[str]:
    """`sql` as it must run on `ch`: itself on one server, its cluster form on a cluster.

    The erasure code runs its deletes through this (`ALTER TABLE events DELETE WHERE …` becomes
    `ALTER TABLE db.events_local ON CLUSTER c DELETE WHERE …`), as the migrations do their DDL.
    """
    if ch.cluster is None:
        return [sql]
    return cluster_statements(sql, ch.cluster, ch.database)


def pending_mutations(ch: ClickHouse) -> int:
    """Mutations of this database not finished yet, on every replica (of the cluster, if any)."""
    sql = "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND is_done = 0"
    return sum(int(out.strip() or 0) for out in ch.query_every_replica(sql))
