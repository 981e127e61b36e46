"""What a forget did, on record: the `forget_audit` rows and the keys-topic status of a forget.

A row holds no personal id: the subject is an HMAC under the audit key, and the ids and rows the
forget reached are counts. The executor (sinks/erasure_executor.py) records each outcome here;
the queue (sinks/erasure_queue.py) reads back which forgets were done before a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field

from ingest.records import Erasure, ForgetStatusRecord
from ingest.secret_file import read_or_create
from ingest.settings import Settings
from sinks.clickhouse import ClickHouse
from sinks.erasure_sql import quote


def audit_key(settings: Settings) -> bytes:
    """The forget_audit HMAC key: the setting, or (embedded chdb: one machine) one generated
    into the data directory. A ClickHouse server is shared by several sinks: the setting."""
    if settings.forget_audit_key is not None:
        return settings.forget_audit_key.get_secret_value().encode()
    if settings.clickhouse_url is not None:
        raise ValueError("MILLIMETRIC_FORGET_AUDIT_KEY is required with a ClickHouse server")
    return read_or_create(settings.data_dir / "forget_audit_key").encode()


@dataclass
class Forget:
    """One forget as the executor carries it out: the devices it reached, the rows it deleted."""

    erasure: Erasure
    devices: set[str]
    counts: dict[str, int] = field(
        default_factory=lambda: {"events": 0, "sessions": 0, "identities": 0}
    )

    def matches(self, project: str, user_id: str, anonymous_id: str) -> bool:
        e = self.erasure
        return project == e["project"] and (
            anonymous_id in self.devices or (bool(user_id) and user_id == e["user_id"])
        )


class ForgetAudit:
    """The `forget_audit` table: one row per forget and outcome, the subject as an HMAC."""

    def __init__(self, ch: ClickHouse, key: bytes) -> None:
        self._ch = ch
        self._key = key

    def subject_hmac(self, erasure: Erasure) -> str:
        """HMAC-SHA256 of `project:subject` under the audit key."""
        subject = erasure["user_id"] or ",".join(erasure["anonymous_ids"])
        message = f"{erasure['project']}:{subject}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def record(
        self, forgets: list[Forget], status: str, reason: str = "", attempts: int = 0
    ) -> None:
        """One forget_audit row per forget, in one insert."""
        now = int(time.time() * 1000)
        columns: dict[str, list[object]] = {
            "forget_id": [f.erasure["forget_id"] for f in forgets],
            "project": [f.erasure["project"] for f in forgets],
            "subject_hmac": [self.subject_hmac(f.erasure) for f in forgets],
            "status": [status] * len(forgets),
            "reason": [reason] * len(forgets),
            "attempts": [attempts] * len(forgets),
            "requested_at_ms": [f.erasure["requested_at"] for f in forgets],
            "completed_at_ms": [now if status == "done" else 0] * len(forgets),
            "anonymous_ids": [len(f.devices) for f in forgets],
            "events_deleted": [f.counts["events"] for f in forgets],
            "sessions_deleted": [f.counts["sessions"] for f in forgets],
            "identities_deleted": [f.counts["identities"] for f in forgets],
            "version": [time.time_ns()] * len(forgets),
        }
        self._ch.insert_columns(
            "forget_audit", list(columns), list(columns.values()), list(columns)
        )

    def done_before(self, forget_ids: list[str]) -> dict[str, ForgetStatusRecord]:
        """Statuses of those forgets already carried out (read back after a restart)."""
        if not forget_ids:
            return {}
        out = self._ch.query_tsv(
            "SELECT forget_id, project, anonymous_ids, events_deleted, sessions_deleted, "
            "identities_deleted, requested_at_ms, completed_at_ms, attempts "
            f"FROM forget_audit FINAL WHERE forget_id IN ({', '.join(map(quote, forget_ids))}) "
            "AND status = 'done'"
        )
        rows = [line.split("\t") for line in out.splitlines()]
        return {r[0]: status_record(r[0], r[1], "done", [int(v) for v in r[2:]], "") for r in rows}


def status_record(
    forget_id: str, project: str, status: str, numbers: list[int], reason: str
) -> ForgetStatusRecord:
    """The keys-topic record of a forget's outcome. `numbers`: anonymous_ids, events, sessions,
    identities deleted, requested_at, completed_at, attempts."""
    devices, events, sessions, identities, requested, completed, attempts = numbers
    return {
        "v": 1,
        "record": "forget_status",
        "forget_id": forget_id,
        "project": project,
        "status": status,  # type: ignore[typeddict-item]
        "reason": reason,
        "attempts": attempts,
        "anonymous_ids": devices,
        "events_deleted": events,
        "sessions_deleted": sessions,
        "identities_deleted": identities,
        "requested_at": requested,
        "completed_at": completed,
    }
