"""Key administration (`millimetric keys ...`): keys and per-project limits on the keys topic.

A raw key is printed once and never stored: the topic holds its SHA-256 and a short prefix.
Each record is sent and acknowledged on its own, one record per broker batch, which keeps the
broker's end offset exact for readers that wait to catch up (see `gateway.auth`).
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from gateway.rate_limit import Limit, load_default_limits
from ingest import forget_status
from ingest.kafka_connection import Security
from ingest.keys_topic import read_all
from ingest.records import (
    ApiKeyRecord,
    HookRecord,
    ProjectLimitRecord,
    encode,
    hash_api_key,
)
from ingest.topics import ensure_topics, topic

KeysTopicRecord = ApiKeyRecord | ProjectLimitRecord | HookRecord

ALPHABET = string.ascii_letters + string.digits


def new_raw_key(kind: str, env: str) -> str:
    """A fresh key: `<kind>_<env>_` and 32 random base62 characters (~190 bits)."""
    return f"{kind}_{env}_" + "".join(secrets.choice(ALPHABET) for _ in range(32))


def record_topic_key(record: Any) -> bytes:
    """The compaction key of a keys-topic record: the key hash, `limit:{project}:{route}`,
    `forget:{forget_id}` or `hook:{hook_id}`."""
    if record.get("record") == "project_limit":
        return f"limit:{record['project']}:{record['route']}".encode()
    if record.get("record") == "forget_status":
        return f"forget:{record['forget_id']}".encode()
    if record.get("record") == "hook":
        return f"hook:{record['hook_id']}".encode()
    return str(record["key_hash"]).encode()


async def publish_key_records(
    bootstrap: str,
    records: Sequence[KeysTopicRecord],
    idempotence: bool = False,
    *,
    security: Security = None,
) -> None:
    """Append records to the keys topic, each acknowledged before the next is sent
    (`security`: the client's TLS and SASL options, as everywhere below)."""
    await ensure_topics(bootstrap, roles=["keys"], security=security)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, **(security or {}), acks="all", enable_idempotence=idempotence
    )
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(
                topic("keys").name, encode(record), key=record_topic_key(record)
            )
    finally:
        await producer.stop()


async def read_key_records(bootstrap: str, *, security: Security = None) -> list[Any]:
    """Every record on the keys topic, oldest first."""
    await ensure_topics(bootstrap, roles=["keys"], security=security)
    return await read_all({"bootstrap_servers": bootstrap, **(security or {})})


async def read_forget_status(
    bootstrap: str, forget_id: str, *, security: Security = None
) -> dict[str, Any]:
    """A forget's status as GET /v1/forget/{forget_id} answers it (without "ok"), read from the
    keys topic the gateway follows."""
    records = await read_key_records(bootstrap, security=security)
    return forget_status.answer(forget_id, forget_status.latest(records, forget_id))


def current_keys(records: list[Any]) -> dict[str, ApiKeyRecord]:
    """The latest record of every key hash (what compaction keeps)."""
    return {r["key_hash"]: r for r in records if "record" not in r}


def current_limits(records: list[Any]) -> dict[tuple[str, str], ProjectLimitRecord]:
    """The project limit overrides in force: (project, route) -> latest record."""
    latest = {(r["project"], r["route"]): r for r in records if r.get("record") == "project_limit"}
    return {k: r for k, r in latest.items() if r["rate"] is not None}


async def set_project_limit(
    bootstrap: str,
    project: str,
    route: str,
    limit: Limit | None,
    idempotence: bool = False,
    *,
    security: Security = None,
) -> ProjectLimitRecord:
    """Override (or, with None, reset to the default) a project's rate limit on one route."""
    routes = load_default_limits()
    if route not in routes:
        raise ValueError(f"unknown route {route!r}; one of {', '.join(routes)}")
    record: ProjectLimitRecord = {
        "v": 1,
        "record": "project_limit",
        "project": project,
        "route": route,
        "rate": limit.rate if limit else None,
        "burst": limit.burst if limit else None,
        "updated_at": int(time.time() * 1000),
    }
    await publish_key_records(bootstrap, [record], idempotence, security=security)
    return record


async def create_key(
    bootstrap: str,
    project: str,
    kind: str,
    env: str,
    origins: list[str],
    idempotence: bool = False,
    *,
    security: Security = None,
) -> str:
    """Create a key and return it raw (the only time it exists outside the caller's hands)."""
    raw = new_raw_key(kind, env)
    record: ApiKeyRecord = {
        "v": 1,
        "key_hash": hash_api_key(raw),
        "prefix": raw[: len(kind) + len(env) + 10],
        "project": project,
        "kind": kind,
        "env": env,  # type: ignore[typeddict-item]
        "origins": origins,
        "created_at": int(time.time() * 1000),
        "revoked_at": None,
    }
    await publish_key_records(bootstrap, [record], idempotence, security=security)
    return raw


async def revoke_key(
    bootstrap: str, key_or_prefix: str, idempotence: bool = False, *, security: Security = None
) -> int:
    """Revoke the key given raw, or every live key starting with the given prefix."""
    live = [
        r
        for r in current_keys(await read_key_records(bootstrap, security=security)).values()
        if r["revoked_at"] is None
    ]
    digest = hash_api_key(key_or_prefix)
    targets = [r for r in live if r["key_hash"] == digest] or [
        r for r in live if len(key_or_prefix) >= 12 and r["prefix"].startswith(key_or_prefix)
    ]
    now = int(time.time() * 1000)
    revoked = [{**r, "revoked_at": now} for r in targets]
    await publish_key_records(bootstrap, revoked, idempotence, security=security)
    return len(targets)
