"""A forget's status as clients are told it, from one source: the `forget_status` records the sinks
put on the keys topic (`ingest.records.ForgetStatusRecord`). GET /v1/forget/{forget_id} (the
gateway follows the topic) and `millimetric forget status` (reads it) both answer with `answer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ingest.records import ForgetStatusRecord

DONE_COUNTS = ("anonymous_ids", "events_deleted", "sessions_deleted", "identities_deleted")


def latest(records: Iterable[Any], forget_id: str) -> ForgetStatusRecord | None:
    """The last status of `forget_id` among keys-topic records, oldest first (what compaction
    keeps), or None if no sink reported it yet."""
    found: ForgetStatusRecord | None = None
    for record in records:
        if record.get("record") == "forget_status" and record["forget_id"] == forget_id:
            found = record
    return found


def answer(forget_id: str, status: ForgetStatusRecord | None) -> dict[str, Any]:
    """What a client is told: `pending` until a sink reported the forget (with the `reason` of
    its last failure and its `attempts` while a sink retries it), then `done` with what it
    deleted and how long it took."""
    if status is None:
        return {"forget_id": forget_id, "status": "pending"}
    if status["status"] != "done":
        return {
            "forget_id": forget_id,
            "status": status["status"],
            "reason": status.get("reason", ""),
            "attempts": status.get("attempts", 0),
        }
    return {
        "forget_id": forget_id,
        "status": "done",
        **{name: status[name] for name in DONE_COUNTS},  # type: ignore[literal-required]
        "duration_ms": status["completed_at"] - status["requested_at"],
    }
