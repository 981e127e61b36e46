"""Every Kafka topic the pipeline uses, in one table.

Stages look topics up here by role; nothing else spells a topic name. Each stage checks at boot
that the roles it needs exist in the table (`require`), so adding a topic is one edit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import Any


@dataclass(frozen=True, slots=True)
class Topic:
    """One topic: its name, what its key is, and how it is kept."""

    name: str
    key: str
    partitions: int
    compacted: bool
    retention_ms: int  # -1 = keep forever
    about: str


DAY_MS = 86_400_000
# The built-in destinations (sinks/destinations), each with a dead-letter topic of its own.
DESTINATIONS = {
    "posthog": "PostHog",
    "mixpanel": "Mixpanel",
    "amplitude": "Amplitude",
    "webhook": "the tracking webhook",
}

TOPICS: dict[str, Topic] = {
    "raw": Topic(
        "millimetric.raw",
        "project:anonymous_id",
        12,
        False,
        7 * DAY_MS,
        "Events as accepted by the gateway (with client IP and User-Agent), and verified webhook "
        "deliveries as received (mapped by the processor). The replayable source "
        "of truth, and the only place a raw IP lives; its retention bounds how long that is.",
    ),
    "enriched": Topic(
        "millimetric.enriched",
        "project:anonymous_id",
        12,
        False,
        3 * DAY_MS,
        "Classified and enriched events, no raw IP. The sink writes them to ClickHouse.",
    ),
    "dead_letter": Topic(
        "millimetric.dead-letter",
        "stage",
        1,
        False,
        7 * DAY_MS,
        "Records a stage could not decode or ClickHouse refused, with the reason. They may hold "
        "personal data, which a forget does not reach: kept no longer than the raw topic.",
    ),
    "keys": Topic(
        "millimetric.keys",
        "sha256(api key), limit:…, forget:…, hook:…",
        1,
        True,
        -1,
        "What every gateway materializes in memory: API keys (hashes only) and revocations, "
        "per-project rate limits, the outcome of each forget, and webhook receivers (with their "
        "HMAC secrets: readable by gateways and administrators only).",
    ),
    "forgets": Topic(
        "millimetric.forgets",
        "project:subject",
        12,
        False,
        30 * DAY_MS,
        "Erasure requests accepted by /v1/forget.",
    ),
    "identities": Topic(
        "millimetric.identities",
        "project:user_id",
        12,
        False,
        30 * DAY_MS,
        "anonymous_id -> user_id links as the processor learns them, re-keyed by user, and "
        "the processor's copy of each forget, behind them: a forget meets every device linked "
        "before it.",
    ),
    "erasures": Topic(
        "millimetric.erasures",
        "project:subject",
        1,
        False,
        30 * DAY_MS,
        "Forgets resolved to every anonymous_id of the person, with their cutoff: each sink "
        "filters them out of its inserts, one sink deletes them. Retention must exceed raw's; "
        "suppressions outlive it in the `suppressions` table.",
    ),
    "forget_destinations": Topic(
        "millimetric.forget-destinations",
        "forget_id:destination",
        1,
        True,
        -1,
        "Each forget's outcome at each destination with a deletion API (PostHog, Mixpanel, "
        "Amplitude): `done`, `refused` with the provider's message, or `nothing_to_delete`.",
    ),
    **{
        f"dead_letter_{name}": Topic(
            f"millimetric.dead-letter.{name}",
            "destination",
            1,
            False,
            7 * DAY_MS,
            f"Enriched events {title} refused (a 4xx naming the event), with its message. "
            "Kept as long as the dead-letter topic, for the same reason.",
        )
        for name, title in DESTINATIONS.items()
    },
}


@cache
def _namespace(raw: str | None) -> str:
    from ingest.settings import Settings

    return Settings().kafka_namespace


def namespaced(name: str) -> str:
    """A topic's or consumer group's name under MILLIMETRIC_KAFKA_NAMESPACE (as is without)."""
    # Keyed by the variable's value: read when asked (a test sets it per test), parsed once.
    namespace = _namespace(os.environ.get("MILLIMETRIC_KAFKA_NAMESPACE"))
    return f"{namespace}.{name}" if namespace else name


def topic(role: str) -> Topic:
    """Return the topic for a role, failing loudly on an unknown role (a wiring bug)."""
    try:
        found = TOPICS[role]
    except KeyError:
        raise KeyError(f"no topic for role {role!r}; roles: {sorted(TOPICS)}") from None
    return replace(found, name=namespaced(found.name))


def require(*roles: str) -> list[Topic]:
    """Boot-time completeness check: every role a stage uses must be in the table."""
    return [topic(role) for role in roles]


async def ensure_topics(
    bootstrap_servers: str,
    replication_factor: int = 1,
    roles: list[str] | None = None,
    *,
    min_insync_replicas: int | None = None,
    security: Mapping[str, Any] | None = None,
) -> None:
    """Create the topics of `roles` (all by default) that do not exist yet, as the table says,
    with `replication_factor` copies of which `min_insync_replicas` must have an `acks=all`
    write (None: the broker's default); `security`: the client's TLS and SASL options."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = require(*(roles or list(TOPICS)))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(security or {}))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                t.name,
                t.partitions,
                replication_factor,
                topic_configs=_configs(t, min_insync_replicas),
            )
            for t in wanted
            if t.name not in existing
        ]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


def _configs(t: Topic, min_insync_replicas: int | None) -> dict[str, str]:
    durability = (
        {} if min_insync_replicas is None else {"min.insync.replicas": str(min_insync_replicas)}
    )
    if t.compacted:
        return {"cleanup.policy": "compact", **durability}
    return {"cleanup.policy": "delete", "retention.ms": str(t.retention_ms), **durability}


def markdown_table() -> str:
    """Render the topics as the README shows them."""
    lines = ["| topic | key | partitions | kept | holds |", "|---|---|---|---|---|"]
    for t in TOPICS.values():
        kept = "compacted" if t.compacted else f"{t.retention_ms // DAY_MS} days"
        lines.append(f"| `{t.name}` | {t.key} | {t.partitions} | {kept} | {t.about} |")
    return "\n".join(lines)
