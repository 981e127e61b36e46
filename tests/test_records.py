"""The raw and enriched topics' wire format: single-event records (v1) and envelopes (v2)."""

from __future__ import annotations

import pytest

from ingest.partitioner import partition_for
from ingest.records import (
    decode,
    encode,
    enriched_events,
    envelope,
    envelopes,
    event_key,
    raw_records,
    record_key,
)

PARTITIONS = 12


def event(n: int, anonymous_id: str) -> dict[str, object]:
    return {"v": 1, "type": "track", "project": "p", "event_id": f"e{n}",
            "anonymous_id": anonymous_id, "user_id": None, "n": n}  # fmt: skip


def pairs(events: list[dict[str, object]]) -> list[tuple[bytes, bytes]]:
    return [(event_key(e), encode(e)) for e in events]


def test_an_envelope_reads_back_as_its_events_and_a_v1_record_as_itself() -> None:
    events = [event(n, "a") for n in range(3)]
    value = envelope([encode(e) for e in events])
    assert decode(value) == {"v": 2, "count": 3, "events": events}
    assert raw_records(value) == events and enriched_events(value) == events
    assert raw_records(encode(events[0])) == [events[0]]  # the previous format, as it was
    assert envelope([encode(events[0])]) == encode(events[0])  # one event: a v1 record


@pytest.mark.parametrize(
    "value",
    [b'{"v":2,"count":3,"events":[{"a":1}]}', b'{"v":2,"count":1}', b"[1,2]", b"{nope"],
)
def test_a_broken_envelope_is_refused(value: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        raw_records(value)


def test_the_key_is_the_gateways() -> None:
    """Envelope or not, an event keeps the key (so the partition) it always had."""
    assert event_key(event(1, "a")) == record_key("p", "a", "e1") == b"p:a"
    no_device = {**event(2, ""), "anonymous_id": None, "user_id": "u9"}
    assert event_key(no_device) == b"p:u9"


def test_one_envelope_per_partition_in_order_on_the_partition_of_each_event() -> None:
    events = [event(n, f"visitor-{n % 7}") for n in range(200)]
    records = pairs(events)
    out = envelopes(records, lambda k: partition_for(k, PARTITIONS), 1 << 20)
    assert len({e.partition for e in out}) == len(out)  # one per partition
    seen: list[int] = []
    for record in out:
        carried = raw_records(record.value)
        assert [e["n"] for e in carried] == record.members == sorted(record.members)
        assert record.key == records[record.members[0]][0]
        assert {partition_for(event_key(e), PARTITIONS) for e in carried} == {record.partition}
        seen += record.members
    assert sorted(seen) == list(range(200))


def test_a_partition_past_the_byte_limit_gets_several_envelopes_in_order() -> None:
    events = [event(n, "same") for n in range(50)]
    records = pairs(events)
    out = envelopes(records, lambda k: 0, 1000)
    assert len(out) > 1 and all(len(e.value) <= 1000 for e in out)
    assert [e["n"] for r in out for e in raw_records(r.value)] == list(range(50))


def test_an_event_larger_than_the_limit_is_alone_in_its_record() -> None:
    big = {**event(1, "a"), "blob": "x" * 2000}
    records = pairs([event(0, "a"), big, event(2, "a")])
    out = envelopes(records, lambda k: 0, 1000)
    assert [r.members for r in out] == [[0], [1], [2]]
