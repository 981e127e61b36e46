"""Forget, in the warehouse: delete what was already written of forgotten people.

Every sink filters erased people out of its inserts (sinks/erasure_filter.py); one sink (see
sinks/erasure_queue.py) carries out the deletes here, for many forgets at once: it records
suppressions where they never expire, waits one grace period for every sink to have the filter,
deletes the people's rows from `events`, `identities` and `sessions` (one delete per table for
the whole batch, split so no statement nears ClickHouse's max_query_size), waits for its own
deletes only and no longer than a setting, waits again and checks nothing is left (deleting
again if a straggler landed), and records each outcome in `forget_audit` (sinks/erasure_audit.py).

`sessions` rows are found by the person's ids directly, as well as through `events`, so they go
even after `events` retention dropped the events. A session_id several people share (clients set
it) is deleted and rebuilt from the events that remain, so the others keep theirs.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from ingest.records import Erasure, ForgetStatusRecord
from sinks.clickhouse import ClickHouse
from sinks.cluster import LOCAL, statements_for
from sinks.erasure_audit import Forget, ForgetAudit, status_record
from sinks.erasure_sql import chunks, quote
from sinks.migrate import migrations, statements

log = logging.getLogger(__name__)

# Passes of delete-then-check: a straggler landing after a delete is caught by the next one.
PASSES = 5
# An event's hour in hourly_rollup, as its view computes it.
HOUR = "toStartOfHour(toDateTime(timestamp, 'UTC'))"
HOURLY_KEYS = ["project", "hour", "event"]


class MutationsPending(Exception):
    """The deletes were issued but ClickHouse did not finish them within the timeout."""


def _view_rebuild(migration: str, table: str, keys: list[str]) -> tuple[list[str], str]:
    """Columns and SELECT of `table`'s view (the one source of truth for its rows)."""
    template = next(text for _, name, text in migrations() if name == migration)
    view = next(
        s for s in template.split(";") if f"MATERIALIZED VIEW IF NOT EXISTS {table}_mv" in s
    )
    select = view.split(f" TO {table} AS", 1)[1]
    return [*keys, *(c for c in re.findall(r"\bAS (\w+)", select) if c not in keys)], select


class ErasureExecutor:
    """Carries out batches of erasures in ClickHouse and records each outcome in its audit."""

    def __init__(
        self, ch: ClickHouse, audit: ForgetAudit, grace_s: float, mutation_timeout_s: float
    ) -> None:
        self._ch = ch
        self._audit = audit
        self._grace = grace_s
        self._timeout = mutation_timeout_s
        self._lightweight = ch.features.has("lightweight_delete")
        columns, select = _view_rebuild("rollups", "sessions", ["project", "session_id"])
        self._session_columns = columns
        self._session_select = statements(select, ch.features)[0]
        columns, select = _view_rebuild("hourly_rollup", "hourly_rollup", HOURLY_KEYS)
        self._hourly_columns = columns
        self._hourly_select = statements(select, ch.features)[0]
        self._unfinished: dict[str, set[str]] = {}  # table -> our mutations still running
        self._carried: dict[str, dict[str, int]] = {}  # forget_id -> counts of a timed-out try

    def _rows(self, sql: str) -> list[list[str]]:
        return [line.split("\t") for line in self._ch.query_tsv(sql).splitlines()]

    def _mutation_ids(self, table: str, done: bool = False) -> set[str]:
        """Mutation ids of `table` (its local tables on a cluster) on every replica; with
        `done`, only those finished on every replica (a replicated mutation has one id)."""
        local = f"{table}{LOCAL}" if self._ch.cluster else table
        sql = (
            "SELECT mutation_id FROM system.mutations WHERE database = currentDatabase() "
            f"AND table = {quote(local)}" + (" AND is_done = 1" if done else "")
        )
        per_replica = [set(out.split()) for out in self._ch.query_every_replica(sql)]
        return set.intersection(*per_replica) if done else set.union(*per_replica)

    def _delete(self, table: str, wheres: list[str]) -> None:
        """Delete, and remember the mutations this made (only those are waited for)."""
        before = self._mutation_ids(table)
        for where in wheres:
            if table == "events" and self._lightweight:
                sql = f"DELETE FROM events WHERE {where}"
            else:
                sql = f"ALTER TABLE {table} DELETE WHERE {where}"
            for statement in statements_for(self._ch, sql):  # ON CLUSTER on a cluster
                self._ch.execute(statement)
        self._unfinished.setdefault(table, set()).update(self._mutation_ids(table) - before)

    def wait_for_mutations(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Wait for this executor's own deletes, at most the timeout; raise MutationsPending."""
        deadline = time.monotonic() + self._timeout
        while True:
            for table, ids in list(self._unfinished.items()):
                ids.difference_update(self._mutation_ids(table, done=True))
                if not ids:
                    del self._unfinished[table]
            running = sum(map(len, self._unfinished.values()))
            if not running:
                return
            if time.monotonic() >= deadline:
                raise MutationsPending(
                    f"{running} ClickHouse deletes still running after {self._timeout:g}s"
                )
            sleep(0.2)

    def _suppress(self, erasures: list[Erasure]) -> None:
        rows = [
            (e["project"], kind, id_, e["forget_id"], e["requested_at"])
            for e in erasures
            if e["suppress"]
            for kind, ids in (
                ("user", [e["user_id"]] if e["user_id"] else []),
                ("device", e["anonymous_ids"]),
            )
            for id_ in ids
        ]
        if rows:
            names = ["project", "kind", "id", "forget_id", "since_ms"]
            data = [list(column) for column in zip(*rows, strict=True)]
            self._ch.insert_columns("suppressions", names, data, names)

    def execute(
        self, erasures: list[Erasure], sleep: Callable[[float], None] = time.sleep
    ) -> list[ForgetStatusRecord]:
        """Delete everything of these people, wait, verify, record. Blocking: run in a thread.
        Raises (nothing recorded as done) when ClickHouse fails or a delete outlasts the timeout."""
        self._suppress(erasures)
        self.wait_for_mutations(sleep)  # deletes an earlier attempt left running come first
        forgets = [Forget(e, set(e["anonymous_ids"])) for e in erasures]
        for f in forgets:  # what an attempt that timed out deleted counts too
            f.counts.update(self._carried.pop(f.erasure["forget_id"], {}))
        try:
            self._delete_all(forgets, sleep)
        except MutationsPending:
            self._carried.update((f.erasure["forget_id"], f.counts) for f in forgets)
            raise
        self._audit.record(forgets, "done")
        log.info("%d forgets done", len(forgets))
        now = int(time.time() * 1000)
        return [
            status_record(
                f.erasure["forget_id"],
                f.erasure["project"],
                "done",
                [len(f.devices), *f.counts.values(), f.erasure["requested_at"], now, 0],
                "",
            )
            for f in forgets
        ]

    def _delete_all(self, forgets: list[Forget], sleep: Callable[[float], None]) -> None:
        erasures = [f.erasure for f in forgets]
        users = [(e["project"], e["user_id"]) for e in erasures if e["user_id"] is not None]
        # Devices the warehouse links to the users too, should processor state lag.
        for table in ("events", "identities"):
            for where in chunks([], users, "anonymous_id", "user_id"):
                for project, user_id, anonymous_id in self._rows(
                    f"SELECT DISTINCT project, user_id, anonymous_id FROM {table} WHERE {where}"
                ):
                    for f in forgets:
                        if f.matches(project, user_id, ""):
                            f.devices.add(anonymous_id)
        devices = [(f.erasure["project"], d) for f in forgets for d in f.devices]
        sleep(self._grace)  # every sink has the erasures in its filter by now
        for _ in range(PASSES):
            if not self._pass(forgets, devices, users):
                break
            sleep(self._grace)  # a straggling insert from before the filter lands by now

    def _tally(self, forgets: list[Forget], what: str, rows: list[tuple[str, ...]]) -> None:
        """Add each (project, user_id, anonymous_id, count) row to the forgets it belongs to."""
        for project, user_id, anonymous_id, count in rows:
            for f in forgets:
                if f.matches(project, user_id, anonymous_id):
                    f.counts[what] += int(count)

    def _pass(
        self, forgets: list[Forget], devices: list[tuple[str, str]], users: list[tuple[str, str]]
    ) -> bool:
        """One delete of everything left of these people; False when nothing was left."""
        plain = chunks(devices, users, "anonymous_id", "user_id")
        states = chunks(
            devices, users, "finalizeAggregation(anonymous_id)", "finalizeAggregation(user_id)"
        )
        count = (
            "SELECT project, user_id, anonymous_id, count() FROM {} WHERE {} "
            "GROUP BY project, user_id, anonymous_id"
        )
        # A group (project, user_id, anonymous_id) matches a chunk whole: keep it once.
        events = list({tuple(r) for w in plain for r in self._rows(count.format("events", w))})
        identities = list(
            {tuple(r) for w in plain for r in self._rows(count.format("identities", w))}
        )
        session_rows = [
            r
            for w in plain
            for r in self._rows(
                f"SELECT DISTINCT project, user_id, anonymous_id, session_id FROM events WHERE {w}"
            )
        ] + [
            r
            for w in states
            for r in self._rows(
                "SELECT DISTINCT project, finalizeAggregation(user_id), "
                f"finalizeAggregation(anonymous_id), session_id FROM sessions WHERE {w}"
            )
        ]
        if not (events or identities or session_rows):
            return False
        hours = sorted(
            {(r[0], r[1]) for w in plain for r in self._rows(f"SELECT DISTINCT project, {HOUR} "
                                                             f"FROM events WHERE {w}")}
        )  # fmt: skip
        self._tally(forgets, "events", events)
        self._tally(forgets, "identities", identities)
        sessions = sorted({(r[0], r[3]) for r in session_rows})
        for f in forgets:
            f.counts["sessions"] += len({(r[0], r[3]) for r in session_rows if f.matches(*r[:3])})
        self._delete("events", [w for w in plain if events])
        self._delete("identities", [w for w in plain if identities])
        self.wait_for_mutations()
        if hours:
            # The hours' sets lose the person's ids: rebuilt from the events that remain.
            targets = chunks(hours, [], "hour", "hour")
            self._rebuild("hourly_rollup", self._hourly_columns, self._hourly_select, targets,
                          chunks(hours, [], HOUR, HOUR))  # fmt: skip
        if sessions:
            # Whole sessions go, then what others did in a shared one comes back from events.
            wheres = chunks(sessions, [], "session_id", "session_id")
            self._rebuild("sessions", self._session_columns, self._session_select, wheres, wheres)
        return True

    def _rebuild(
        self, table: str, columns: list[str], select: str, targets: list[str], sources: list[str]
    ) -> None:
        """Delete `table`'s rows matching `targets`, then insert them again from the events
        matching `sources` (what is left of them), through the table's view SELECT."""
        self._delete(table, targets)
        self.wait_for_mutations()
        for where in sources:
            self._ch.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                # FINAL: after a replay, only the latest version of each row feeds the states.
                + re.sub(
                    r"FROM events\s+GROUP BY", f"FROM events FINAL WHERE {where} GROUP BY", select
                )
            )
