"""Enrichment: one raw event in, one enriched event out. Pure (no Faust), called per event.

Everything here is deterministic in the raw record, so replaying the raw topic rebuilds the same
rows: a fabricated anonymous_id derives from the event itself, ip_hash from the event's UTC date.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping
from typing import Any, TypedDict

import orjson

from ingest.records import ENRICHED_SCHEMA_VERSION, EnrichedEvent, RawEvent
from processors.classify import CLASSIFIER_VERSION, Classifier
from processors.geo import CountryLookup, country_from_edge_header
from processors.useragent import UserAgentParser

# Fixed namespace so fabricated ids are stable across processes and replays.
ANONYMOUS_NAMESPACE = uuid.UUID("6f1d0c1e-6c5b-4c8e-9a51-3b0f3d5a2e10")
DAY_MS = 86_400_000


class IpDerived(TypedDict):
    """The enriched fields that come from the client IP."""

    ip_hash: str
    country: str


class DailyIpHasher:
    """ip_hash = HMAC-SHA256(key = salt ‖ UTC date, msg = ip): unlinkable across days."""

    def __init__(self, salt: bytes) -> None:
        self._salt = salt
        self._day = -1
        self._mac: hmac.HMAC | None = None

    def hash(self, ip: str | None, at_ms: int) -> str:
        """The event day's hash of `ip`, or "" when there is no IP."""
        if not ip:
            return ""
        day = at_ms // DAY_MS
        if day != self._day or self._mac is None:
            date = time.strftime("%Y-%m-%d", time.gmtime(day * 86_400)).encode()
            self._mac, self._day = hmac.new(self._salt + date, digestmod=hashlib.sha256), day
        mac = self._mac.copy()  # copying the keyed state skips re-deriving the key per event
        mac.update(ip.encode())
        return mac.hexdigest()[:32]


class Enricher:
    """Fills in what the server adds: ids, session, ip_hash, source, geo and device."""

    def __init__(
        self,
        ip_salt: bytes,
        session_minutes: int,
        classifier: Classifier,
        user_agents: UserAgentParser,
        countries: CountryLookup,
        project_classifiers: Mapping[str, Classifier] | None = None,
    ) -> None:
        self._ips = DailyIpHasher(ip_salt)
        self._bucket_ms = session_minutes * 60_000
        self._classifier = classifier
        self._project_classifiers = project_classifiers or {}
        self._user_agents = user_agents
        self._countries = countries

    def enrich(self, raw: RawEvent, user_id: str | None = None) -> EnrichedEvent:
        """Enrich one event; `user_id` is a stitched identity for events that carry none."""
        project = raw["project"]
        anonymous_id = raw["anonymous_id"] or str(
            uuid.uuid5(ANONYMOUS_NAMESPACE, f"{project}:{raw['user_id'] or raw['event_id']}")
        )
        ts = raw["timestamp"]
        ctx = raw["context"]
        classifier = self._project_classifiers.get(project, self._classifier)
        source = classifier.classify(raw["url"], raw["referrer"], raw.get("campaign"))
        device = self._user_agents.parse(ctx.get("user_agent"))
        derived = self.ip_derived(raw)
        # An identify's properties are its traits (the identities table keeps the latest).
        properties: dict[str, Any] = (
            raw.get("traits", {}) if raw["type"] == "identify" else raw["properties"]
        )
        enriched: EnrichedEvent = {
            "v": ENRICHED_SCHEMA_VERSION,
            "type": raw["type"],
            "project": project,
            "event_id": raw["event_id"],
            "event": raw["event"],
            "timestamp": ts,
            "received_at": raw["received_at"],
            "anonymous_id": anonymous_id,
            "user_id": raw["user_id"] or user_id or "",
            "session_id": raw["session_id"] or f"{anonymous_id}-{ts // self._bucket_ms}",
            "url": raw["url"] or "",
            "path": raw["path"] or "",
            "referrer": raw["referrer"] or "",
            "properties": orjson.dumps(properties).decode() if properties else "{}",
            "source": source.source,
            "medium": source.medium,
            "campaign": source.campaign,
            "channel": source.channel,
            "source_confidence": source.source_confidence,
            "source_rule_id": source.source_rule_id,
            "click_id": source.click_id,
            "click_id_network": source.click_id_network,
            "classifier_version": CLASSIFIER_VERSION,
            "country": derived["country"],
            "device_type": device.device_type,
            "browser": device.browser,
            "os": device.os,
            "is_bot": device.is_bot,
            "ip_hash": derived["ip_hash"],
        }
        if ctx.get("env") == "test":  # a test key's event: destinations skip it
            enriched["env"] = "test"
        return enriched

    def ip_derived(self, raw: RawEvent) -> IpDerived:
        """What enrichment takes from the client IP: its day's hash and the country. A redacted
        context (a dead letter's) carries these instead of the IP and gives them back as-is."""
        ctx = raw["context"]
        ip = ctx.get("ip")
        if not ip and "ip_hash" in ctx:
            return {
                "ip_hash": ctx["ip_hash"],
                "country": country_from_edge_header(ctx.get("country")),
            }
        return {
            "ip_hash": self._ips.hash(ip, raw["received_at"]),
            "country": country_from_edge_header(ctx.get("country")) or self._countries.country(ip),
        }
