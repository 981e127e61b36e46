"""Per-project destinations (`millimetric destinations add|list|remove`): records on the keys
topic, keyed `destination:{id}`, that the destinations process follows.

A destination sends its credentials (API keys, tokens, an Authorization header), so they cannot
be hashed: each is encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under
MILLIMETRIC_DESTINATIONS_SECRET_KEY, or a key generated into `<data_dir>/destinations_key`
(mode 0600). The keys topic holds only the ciphertext; URLs and hosts are stored as given.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from cryptography.fernet import Fernet

from ingest.keys_topic import read_all
from ingest.records import DestinationRecord, encode
from ingest.secret_file import read_or_create
from ingest.settings import Settings
from ingest.topics import ensure_topics, topic
from sinks.destinations.amplitude import Amplitude, AmplitudeDeletion
from sinks.destinations.contract import Deletion, Destination
from sinks.destinations.mixpanel import Mixpanel, MixpanelDeletion
from sinks.destinations.posthog import PostHog, PostHogDeletion
from sinks.destinations.webhook import Webhook

Security = dict[str, Any] | None
ALPHABET = string.ascii_letters + string.digits
# Per type: the settings it needs, the ones it may take, and which of them are secrets.
REQUIRED = {
    "posthog": ("api_key",),
    "mixpanel": ("token",),
    "amplitude": ("api_key",),
    "webhook": ("url",),
}
OPTIONAL = {
    "posthog": ("host", "personal_api_key", "project_id", "app_host"),
    "mixpanel": ("host", "api_secret", "gdpr_token", "app_host"),
    "amplitude": ("host", "secret_key", "app_host"),
    "webhook": ("auth", "secret"),
}
# Per type: what its deletion API needs besides the destination's own key (forgets forwarded).
DELETION = {
    "posthog": ("personal_api_key", "project_id"),
    "mixpanel": ("gdpr_token",),
    "amplitude": ("secret_key",),
}
SECRETS = frozenset(
    {"api_key", "token", "api_secret", "auth", "secret", "personal_api_key", "gdpr_token",
     "secret_key"}
)  # fmt: skip


def cipher(settings: Settings) -> Fernet:
    """The Fernet cipher of destination credentials: from the setting, or the data dir's key."""
    if settings.destinations_secret_key is not None:
        text = settings.destinations_secret_key.get_secret_value()
        if not text:  # an empty line in a secret file: no key at all, not a weak one
            raise ValueError("MILLIMETRIC_DESTINATIONS_SECRET_KEY is set but empty")
    else:
        text = read_or_create(settings.data_dir / "destinations_key")
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()))


def new_destination_id() -> str:
    """`ds_` and 16 base62 characters."""
    return "ds_" + "".join(secrets.choice(ALPHABET) for _ in range(16))


def new_record(
    settings: Settings, project: str, kind: str, given: dict[str, str]
) -> DestinationRecord:
    """A destination record of `project`, its secrets encrypted; raises ValueError on a type or
    settings the type does not take."""
    if kind not in REQUIRED:
        raise ValueError(f"unknown type {kind!r}; one of {', '.join(REQUIRED)}")
    missing = [name for name in REQUIRED[kind] if name not in given]
    unknown = sorted(set(given) - {*REQUIRED[kind], *OPTIONAL[kind]})
    if missing:
        raise ValueError(f"{kind} needs --{', --'.join(missing).replace('_', '-')}")
    if unknown:
        raise ValueError(f"{kind} does not take --{', --'.join(unknown).replace('_', '-')}")
    # Part of a deletion API's credentials would forward no forget, and say nothing of it.
    deleting = set(DELETION.get(kind, ())) | ({"app_host"} if kind in DELETION else set())
    if (set(given) & deleting) and (lacking := [n for n in DELETION[kind] if n not in given]):
        flags = ", --".join(lacking).replace("_", "-")
        raise ValueError(f"{kind}'s deletion API (forgets) also needs --{flags}")
    fernet = cipher(settings)
    record: DestinationRecord = {
        "v": 1,
        "record": "destination",
        "destination_id": new_destination_id(),
        "project": project,
        "type": kind,
        "settings": {k: v for k, v in given.items() if k not in SECRETS},
        "secrets": {
            k: fernet.encrypt(v.encode()).decode() for k, v in given.items() if k in SECRETS
        },
        "created_at": int(time.time() * 1000),
        "removed_at": None,
    }
    build(record, fernet)  # refuses what the destination itself refuses (a webhook secret)
    return record


def _default(name: str) -> str:
    return str(Settings.model_fields[name].default)


def _values(record: DestinationRecord, fernet: Fernet) -> dict[str, str]:
    values = {**record["settings"]}
    values.update({k: fernet.decrypt(v.encode()).decode() for k, v in record["secrets"].items()})
    return values


def build(record: DestinationRecord, fernet: Fernet) -> Destination:
    """The destination a record describes, its secrets decrypted."""
    values, kind = _values(record, fernet), record["type"]
    if kind == "posthog":
        return PostHog(values["api_key"], values.get("host", _default("posthog_host")))
    if kind == "mixpanel":
        host = values.get("host", _default("mixpanel_host"))
        return Mixpanel(values["token"], host, values.get("api_secret"))
    if kind == "amplitude":
        return Amplitude(values["api_key"], values.get("host", _default("amplitude_host")))
    return Webhook(values["url"], values.get("auth"), values.get("secret"))


def deletion(record: DestinationRecord, fernet: Fernet) -> Deletion | None:
    """The deletion API forgets are forwarded to, when the record has its credentials."""
    kind = record["type"]
    given = {*record["settings"], *record["secrets"]}
    if kind not in DELETION or not set(DELETION[kind]) <= given:
        return None
    values = _values(record, fernet)
    if kind == "posthog":
        host = values.get("app_host", _default("posthog_app_host"))
        return PostHogDeletion(values["personal_api_key"], values["project_id"], host)
    if kind == "mixpanel":
        host = values.get("app_host", _default("mixpanel_app_host"))
        return MixpanelDeletion(values["token"], values["gdpr_token"], host)
    host = values.get("app_host", _default("amplitude_app_host"))
    return AmplitudeDeletion(values["api_key"], values["secret_key"], host)


async def publish(bootstrap: str, record: DestinationRecord, *, security: Security = None) -> None:
    """Put `record` on the keys topic, acknowledged."""
    await ensure_topics(bootstrap, roles=["keys"], security=security)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **(security or {}), acks="all")
    await producer.start()
    try:
        key = f"destination:{record['destination_id']}".encode()
        await producer.send_and_wait(topic("keys").name, encode(record), key=key)
    finally:
        await producer.stop()


async def current(bootstrap: str, *, security: Security = None) -> dict[str, DestinationRecord]:
    """The latest record of every destination on the keys topic, removed ones included."""
    await ensure_topics(bootstrap, roles=["keys"], security=security)
    records = await read_all({"bootstrap_servers": bootstrap, **(security or {})})
    return {
        r["destination_id"]: r  # type: ignore[misc]
        for r in records
        if r.get("record") == "destination"
    }


async def remove(bootstrap: str, destination_id: str, *, security: Security = None) -> None:
    """Mark the destination removed: the destinations process stops its runner."""
    found = (await current(bootstrap, security=security)).get(destination_id)
    if found is None or found["removed_at"] is not None:
        raise ValueError(f"no destination {destination_id!r}")
    removed: DestinationRecord = {**found, "secrets": {}, "removed_at": int(time.time() * 1000)}
    await publish(bootstrap, removed, security=security)


def shown(records: Sequence[DestinationRecord]) -> list[dict[str, Any]]:
    """What `list` prints: no secret, only which ones are set."""
    return [
        {
            "id": r["destination_id"],
            "project": r["project"],
            "type": r["type"],
            **r["settings"],
            "secrets": sorted(r["secrets"]),
        }
        for r in records
        if r["removed_at"] is None
    ]
