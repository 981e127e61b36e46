"""Times given on the command line: ISO 8601, UTC unless they name a zone."""

from __future__ import annotations

from datetime import UTC, datetime


def epoch_ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 time; ValueError when it is not one."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
