"""Dead letters without the IP: a redacted record enriches to the same row as the original."""

from __future__ import annotations

from pathlib import Path

from ingest.records import decode
from processors.classify import Classifier
from processors.dead_letters import Source, dead_letter_value, redact
from processors.enrich import Enricher
from processors.geo import CountryLookup
from processors.useragent import UserAgentParser
from tests.mmdb_fixture import write_country_mmdb

IP = "81.2.69.160"


def test_a_redacted_record_enriches_to_the_same_row(tmp_path: Path) -> None:
    countries = CountryLookup(write_country_mmdb(tmp_path / "c.mmdb", {"81.2.69.0/24": "GB"}))
    enricher = Enricher(b"salt", 30, Classifier(), UserAgentParser(), countries)
    raw = {
        "v": 1, "type": "track", "project": "demo", "event_id": "e1", "event": "page",
        "timestamp": 1_700_000_000_000, "received_at": 1_700_000_000_000,
        "anonymous_id": "a1", "user_id": None, "session_id": None,
        "url": "https://example.com/", "path": "/", "referrer": None, "properties": {},
        "context": {"ip": IP, "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"},
    }  # fmt: skip
    redacted = redact(raw, dict(enricher.ip_derived(raw)))  # type: ignore[arg-type]
    assert "ip" not in redacted["context"] and redacted["context"]["country"] == "GB"
    assert enricher.enrich(redacted) == enricher.enrich(raw)  # type: ignore[arg-type]
    countries.close()


def test_an_error_quoting_the_ip_is_redacted_too() -> None:
    error = ValueError(f"{IP!r} does not appear to be an IPv4 or IPv6 address")
    letter = decode(dead_letter_value("enrich_failed", error, Source("raw", 3, 7), None, IP))
    assert IP not in letter["reason"] and letter["source"] == {
        "topic": "raw", "partition": 3, "offset": 7, "index": 0
    }  # fmt: skip
