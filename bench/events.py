"""The synthetic traffic: varied, deterministic events in the shapes the pipeline carries.

A small pool of visitors, landing URLs (UTM, click ids, plain), referrers and User-Agents, so
classification, UA parsing and geo do real work while their caches behave as in production
(many repeats, some distinct values).
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from ingest.partitioner import partition_for
from ingest.records import RAW_SCHEMA_VERSION, RawEvent, envelopes
from ingest.topics import topic

# Records a bench design puts on the raw and enriched topics: MILLIMETRIC_ENVELOPES's values.
DESIGNS = {"single records": "false", "envelopes": "true"}

URLS = (
    "https://shop.example/?utm_source=facebook&utm_medium=cpc&utm_campaign=spring&fbclid=AbC{n}",
    "https://shop.example/pricing?gclid=Cj0KCQ{n}",
    "https://shop.example/blog/post-{n}",
    "https://shop.example/?utm_source=newsletter&utm_medium=email&utm_campaign=may",
    "https://shop.example/",
    "https://shop.example/docs/start?ref=hn",
)
REFERRERS = (
    "https://www.google.com/",
    "https://l.facebook.com/",
    "",
    "https://news.ycombinator.com/item?id={n}",
    "https://duckduckgo.com/",
    "https://shop.example/",
)
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.6367.82 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
)
# Networks of the bench's geo database (bench.services.write_geo_db) and the IPs drawn in them.
GEO_NETWORKS = {"81.2.69.0/24": "GB", "2.125.160.0/24": "FR", "89.160.20.0/24": "SE"}
IP_PREFIXES = ("81.2.69.", "2.125.160.", "89.160.20.", "203.0.113.")


def track_body(rng: random.Random, n: int) -> dict[str, Any]:
    """One /v1/track (or /v1/batch entry) body, as an sk_ server-side sender would send it."""
    visitor = rng.randrange(5000)
    return {
        "event": rng.choice(("page_view", "page_view", "page_view", "signup", "add_to_cart")),
        "anonymous_id": f"anon-{visitor}",
        "user_id": f"user-{visitor}" if visitor % 4 == 0 else None,
        "url": rng.choice(URLS).format(n=n % 97),
        "referrer": rng.choice(REFERRERS).format(n=n % 89) or None,
        "properties": {"plan": "free", "price": n % 100, "items": ["a", "b"]},
        "ip": rng.choice(IP_PREFIXES) + str(rng.randrange(1, 255)),
        "user_agent": rng.choice(USER_AGENTS),
    }


def raw_event(rng: random.Random, n: int, now_ms: int) -> RawEvent:
    """The raw record the gateway would publish for `track_body(rng, n)` (validate._record)."""
    body = track_body(rng, n)
    return {
        "v": RAW_SCHEMA_VERSION,
        "type": "track",
        "project": "bench",
        "event_id": uuid.UUID(int=rng.getrandbits(128)).hex,
        "event": body["event"],
        "timestamp": now_ms - rng.randrange(60_000),
        "received_at": now_ms,
        "anonymous_id": body["anonymous_id"],
        "user_id": body["user_id"],
        "session_id": None,
        "url": body["url"],
        "path": None,
        "referrer": body["referrer"],
        "properties": body["properties"],
        "context": {"ip": body["ip"], "user_agent": body["user_agent"]},
    }


def raw_events(count: int, now_ms: int, seed: int = 7) -> list[RawEvent]:
    """`count` raw records, the same for the same seed."""
    rng = random.Random(seed)
    return [raw_event(rng, n, now_ms) for n in range(count)]


def batch_body(count: int, seed: int = 11) -> dict[str, Any]:
    """A /v1/batch body of `count` events."""
    rng = random.Random(seed)
    return {"events": [track_body(rng, n) for n in range(count)]}


def grouped(records: list[tuple[bytes, bytes]], per_request: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) events `records` as envelopes, as a producer of `per_request` events at
    a time groups them (one record per partition per request, under 1 MB)."""
    partitions = topic("raw").partitions
    out: list[tuple[bytes, bytes]] = []
    for start in range(0, len(records), per_request):
        chunk = records[start : start + per_request]
        packed = envelopes(chunk, lambda key: partition_for(key, partitions), 1_000_000)
        out += [(e.key, e.value) for e in packed]
    return out
