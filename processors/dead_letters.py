"""What the processor puts on the dead-letter topic: the reason, where the record came from, and
the record with its client IP redacted.

Dead letters are kept for the topic's retention (7 days, as the raw topic), and still must not
carry the IP: a decodable record keeps everything a retry needs, with `context.ip`
replaced by what enrichment derives from it (`ip_hash`, `country`), which `Enricher` takes back
as-is, so a record replayed from a dead letter enriches to the same row. A record that cannot be
decoded keeps no content (it could hold an IP anywhere, and no retry could decode it): its raw
topic coordinates point at the original for the raw topic's retention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ingest.records import encode

# Reason -> what it means; the label of `millimetric_dead_letters_total{stage="processor"}`.
REASONS: dict[str, str] = {
    "undecodable": "not a JSON object: no content is kept",
    "enrich_failed": "enrichment raised on this record",
    "link_refused": "the broker refused the identify's identity link for good",
    "record_too_large": "the broker refuses the enriched record (or its dead letter) for its size",
    "forget_failed": "a forget request could not be resolved (kept whole: it holds no IP)",
    "unmappable": "a webhook delivery the hook's mapping cannot turn into an event",
}


@dataclass(frozen=True, slots=True)
class Source:
    """Where a raw record was read: enough to find it again on the raw topic."""

    topic: str
    partition: int
    offset: int
    index: int = 0  # the event's place in the record's envelope (0: the record's only event)


def redact(record: dict[str, Any], derived: dict[str, str] | None) -> dict[str, Any]:
    """`record` without its client IP; `derived` (ip_hash, country) takes the IP's place. A
    context that is not an object is dropped whole (it could be the IP itself)."""
    original = record.get("context")
    context = {k: v for k, v in original.items() if k != "ip"} if isinstance(original, dict) else {}
    if derived is not None:
        context.update(derived)
    return {**record, "context": context}


def dead_letter_value(
    reason: str,
    error: BaseException,
    source: Source,
    record: dict[str, Any] | None,
    ip: object,
) -> bytes:
    """The dead-letter value for a raw record; `record` must already be redacted (or None)."""
    detail = f"{type(error).__name__}: {error}"
    if isinstance(ip, str) and ip:  # error messages may quote the IP (ipaddress does)
        detail = detail.replace(ip, "<ip>")
    return encode(
        {
            "stage": "processor",
            "reason": f"{reason}: {detail}"[:2000],
            "source": {
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
                "index": source.index,
            },
            "record": record,
        }
    )
