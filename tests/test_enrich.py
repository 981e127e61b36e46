"""Enrichment promises, in-process: ip_hash rotates at UTC midnight, an event's own user_id wins
over stitching, and the same raw record always enriches to the same row (replay)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import pytest

from processors.classify import Classifier
from processors.enrich import DailyIpHasher, Enricher
from processors.geo import CountryLookup
from processors.useragent import UserAgentParser

pytestmark = pytest.mark.unit

IP = "81.2.69.160"
MIDNIGHT_MS = int(datetime(2026, 3, 29, tzinfo=UTC).timestamp() * 1000)


def reference(salt: bytes, day: str, ip: str) -> str:
    """The README's ip_hash: HMAC-SHA256 keyed by salt ‖ UTC date, 32 hex chars."""
    return hmac.new(salt + day.encode(), ip.encode(), hashlib.sha256).hexdigest()[:32]


def test_ip_hash_rotates_at_utc_midnight() -> None:
    hasher = DailyIpHasher(b"salt")
    before, after = hasher.hash(IP, MIDNIGHT_MS - 1), hasher.hash(IP, MIDNIGHT_MS)
    assert before == reference(b"salt", "2026-03-28", IP)
    assert after == reference(b"salt", "2026-03-29", IP)
    assert before != after
    # The same whole UTC day (whatever the machine's time zone) hashes alike, also when an
    # older event comes after a newer one.
    assert hasher.hash(IP, MIDNIGHT_MS + 86_400_000 - 1) == after
    assert hasher.hash(IP, MIDNIGHT_MS - 86_400_000) == before
    assert hasher.hash(None, MIDNIGHT_MS) == hasher.hash("", MIDNIGHT_MS) == ""


def raw(**fields: Any) -> dict[str, Any]:
    return {
        "v": 1, "type": "track", "project": "demo", "event_id": "e1", "event": "page",
        "timestamp": MIDNIGHT_MS + 5_000, "received_at": MIDNIGHT_MS + 6_000,
        "anonymous_id": None, "user_id": None, "session_id": None,
        "url": "https://example.com/?utm_source=news", "path": "/", "referrer": None,
        "properties": {"n": 1}, "context": {"ip": IP, "user_agent": "Mozilla/5.0 Firefox/120.0"},
        **fields,
    }  # fmt: skip


def enricher() -> Enricher:
    return Enricher(b"salt", 30, Classifier(), UserAgentParser(), CountryLookup(None))


def test_an_events_own_user_id_is_not_overwritten_by_stitching() -> None:
    e = enricher()
    assert e.enrich(raw(user_id="own"), "stitched")["user_id"] == "own"  # type: ignore[arg-type]
    assert e.enrich(raw(), "stitched")["user_id"] == "stitched"  # type: ignore[arg-type]


def test_the_same_raw_record_enriches_to_the_same_row() -> None:
    """Replay determinism: fabricated ids, session, ip_hash and source derive from the record."""
    first = enricher().enrich(raw(), "u")  # type: ignore[arg-type]
    again = enricher().enrich(raw(), "u")  # type: ignore[arg-type]
    assert first == again
    assert first["anonymous_id"] and first["session_id"] and first["ip_hash"]


def test_a_test_keys_event_is_marked_and_a_live_ones_is_not() -> None:
    # Destinations skip test traffic by this mark (README, Destinations).
    e = enricher()
    marked = e.enrich(raw(context={"ip": IP, "env": "test"}))  # type: ignore[arg-type]
    assert marked["env"] == "test"  # type: ignore[typeddict-item]
    assert "env" not in e.enrich(raw())  # type: ignore[arg-type]
