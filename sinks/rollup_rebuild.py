"""Rebuilding `daily_rollup` and `sessions` for days a replay re-derived, from `events FINAL`.

The aggregates' states are sets and extrema, so a replayed row that changes nothing they group
by changes nothing. One that changes `source`/`medium`/`channel` does: the view adds its event to
the new group of `daily_rollup` while the old group keeps it (counted twice), and a session's
`argMin(source, timestamp)` sees two rows of the same time and may keep either. So after a replay
the affected days' rollup rows, and the sessions with events on those days, are deleted and
inserted again from `events FINAL` (one row per event, the highest version), through the views'
own SELECTs. `hourly_rollup` groups by nothing a replay can change (project, hour, event), so it
is left as it is. A live insert meanwhile is harmless: it lands after the delete, and its states
hold what the rebuild's read of `events` holds too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from sinks.clickhouse import ClickHouse
from sinks.cluster import pending_mutations, statements_for
from sinks.erasure_sql import quote
from sinks.migrate import migrations, statements

MUTATION_POLL_S = 0.2


def view_query(view: str, ch: ClickHouse) -> tuple[str, list[str], str]:
    """(target table, its columns, SELECT) of a materialized view, as the latest migration
    defines it, rendered for this server."""
    for _, _, template in reversed(migrations()):
        for sql in statements(template, ch.features):
            if match := re.match(
                rf"CREATE MATERIALIZED VIEW IF NOT EXISTS {view}\s+TO (\w+) AS", sql
            ):
                select = sql[match.end() :].strip()
                items = select.split("FROM", 1)[0].removeprefix("SELECT").strip().splitlines()
                columns = [item.strip().rstrip(",").split(" AS ")[-1] for item in items]
                return match[1], columns, select
    raise LookupError(f"no migration defines {view}")


def _filtered(select: str, where: str) -> str:
    """The view's SELECT over the deduplicated events, only the rows matching `where`."""
    return re.sub(
        r"FROM events\s+(WHERE\s.*?\s)?GROUP BY",
        f"FROM events FINAL WHERE {where} GROUP BY",
        select,
        flags=re.S,
    )


def _wait_for_mutations(ch: ClickHouse, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while pending_mutations(ch):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"ClickHouse deletes still running after {timeout_s:g}s")
        time.sleep(MUTATION_POLL_S)


def _run(ch: ClickHouse, sql: str) -> None:
    for statement in statements_for(ch, sql):  # ON CLUSTER forms on a cluster
        ch.execute(statement)


def received_days(
    ch: ClickHouse, since_ms: int, until_ms: int | None, project: str | None
) -> dict[str, set[str]]:
    """project -> the days (YYYY-MM-DD) of events received in [since_ms, until_ms): what a
    replay of that window re-derived, whichever run of it stored them."""
    where = [f"received_at >= toDateTime({since_ms // 1000}, 'UTC')"]
    if until_ms is not None:
        where.append(f"received_at < toDateTime({-(-until_ms // 1000)}, 'UTC')")
    if project is not None:
        where.append(f"project = {quote(project)}")
    days_of = "SELECT DISTINCT project, toString(toDate(timestamp)) FROM events WHERE "
    rows = ch.query_tsv(days_of + " AND ".join(where))
    days: dict[str, set[str]] = {}
    for row in rows.splitlines():
        name, day = row.split("\t")
        days.setdefault(name, set()).add(day)
    return days


def rebuild(ch: ClickHouse, project: str, days: Iterable[str], timeout_s: float = 600) -> None:
    """Rebuild `daily_rollup` for `project`'s `days` (YYYY-MM-DD) and its sessions with events on
    them, from `events FINAL`."""
    dates = ", ".join(f"toDate({quote(day)})" for day in sorted(days))
    if not dates:
        return
    on_days = f"project = {quote(project)} AND toDate(timestamp) IN ({dates})"
    touched = f"SELECT session_id FROM events WHERE {on_days}"
    sessions = f"project = {quote(project)} AND session_id IN ({touched})"
    # Read through Distributed tables, the subquery must run once, its result sent to the shards.
    in_ = "GLOBAL IN" if ch.cluster else "IN"
    insert_sessions = f"project = {quote(project)} AND session_id {in_} ({touched})"
    _run(
        ch, f"ALTER TABLE daily_rollup DELETE WHERE project = {quote(project)} AND day IN ({dates})"
    )
    _run(ch, f"ALTER TABLE sessions DELETE WHERE {sessions}")
    _wait_for_mutations(ch, timeout_s)
    for view, where in (("daily_rollup_mv", on_days), ("sessions_mv", insert_sessions)):
        table, columns, select = view_query(view, ch)
        ch.execute(f"INSERT INTO {table} ({', '.join(columns)}) {_filtered(select, where)}")
