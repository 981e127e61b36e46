"""Authentication: API keys, materialized from the compacted keys topic.

Every gateway replica reads the whole keys topic at start and then follows it, so a key created
or revoked anywhere reaches every replica within a fetch interval (about a second). Only SHA-256
hashes of keys are stored; a lookup hashes the presented key and finds its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.rate_limit import Limit
from ingest.keys_topic import KeysReader
from ingest.records import (
    ApiKeyRecord,
    ForgetStatusRecord,
    ProjectLimitRecord,
    hash_api_key,
)

log = logging.getLogger(__name__)

KEYS_LOADING_RETRY_AFTER = "1"  # seconds; a replica reads the keys topic in about that
SEGMENT_ROUTES = ("page", "screen", "group", "alias")  # Segment's calls (gateway/segment.py)
KEY_FORMAT = re.compile(r"(pk|sk|rk)_(live|test)_[A-Za-z0-9]{16,128}")

# Which key kinds may call which route; the error code when one may not.
ROUTE_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "track": (frozenset({"pk", "sk"}), "read_only_key"),
    "identify": (frozenset({"pk", "sk"}), "read_only_key"),
    "batch": (frozenset({"pk", "sk"}), "read_only_key"),
    "forget": (frozenset({"sk"}), "forget_requires_secret_key"),
    "read": (frozenset({"rk", "sk"}), "publishable_key_cannot_read"),
} | {route: (frozenset({"pk", "sk"}), "read_only_key") for route in SEGMENT_ROUTES}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the project and the kind of key."""

    project: str
    kind: str
    prefix: str
    env: str = "live"  # "test" for *_test_* keys: their events are marked so


class AuthError(Exception):
    """A request that may not proceed; `code` is a row of the error table."""

    def __init__(self, code: str, retry_after: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.retry_after = retry_after  # seconds, for refusals that are not final


class KeyStore:
    """The keys topic as in-memory maps, kept current: key hash -> key record, and
    (project, route) -> rate-limit override."""

    def __init__(
        self,
        kafka: dict[str, Any],
        handlers: dict[str, Callable[[dict[str, Any]], None]] | None = None,
        stale_after_s: float = 10.0,
    ) -> None:
        self._kafka = kafka  # aiokafka connection options: bootstrap servers, TLS, SASL
        self._handlers = handlers or {}  # other record kinds on the topic (e.g. "hook")
        # Heard nothing from the broker for this long: a key not found may just be unseen.
        self.stale_after_s = stale_after_s
        self._reader = KeysReader(kafka)
        self._keys: dict[str, ApiKeyRecord] = {}
        self._limits: dict[tuple[str, str], Limit] = {}
        self._forgets: dict[str, ForgetStatusRecord] = {}
        self._origins: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self.loaded = self._reader.loaded

    async def start(self) -> None:
        """Begin reading the keys topic from its start in the background; `loaded` is set once
        caught up (until then requests are answered `keys_loading`, never refused)."""
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for records in self._reader.fetches():
            for record in records:
                try:
                    self.apply(record)
                except Exception:  # one bad record stops nothing: a revocation after it counts
                    log.exception("skipping an invalid keys record (%s)", record.get("record"))

    def lagging(self) -> bool:
        """Whether keys may exist that this store has not read: the broker has records past
        its position, or has not answered a fetch for `stale_after_s`."""
        consumer = self._reader.consumer
        if consumer is None or not self.loaded.is_set():
            return True
        polled = consumer.last_poll_timestamp(self._reader.tp)
        if polled is None or time.time() * 1000 - polled > self.stale_after_s * 1000:
            return True
        highwater = consumer.highwater(self._reader.tp)
        return highwater is not None and self._reader.position < highwater

    def apply(self, record: dict[str, Any]) -> None:
        """Apply one record from the keys topic (a key, a revocation, a project limit or a
        forget's outcome)."""
        if record.get("record") == "project_limit":
            self._apply_limit(record)  # type: ignore[arg-type]
            return
        if record.get("record") == "forget_status":
            self._forgets[record["forget_id"]] = record  # type: ignore[assignment]
            return
        if record.get("record") == "destination":  # the destinations process's, not ours
            return
        if (handle := self._handlers.get(record.get("record", ""))) is not None:
            handle(record)
            return
        if record["revoked_at"] is not None:
            self._keys.pop(record["key_hash"], None)
        else:
            self._keys[record["key_hash"]] = record
        self._origins = frozenset(
            o for r in self._keys.values() if r["kind"] == "pk" for o in r["origins"]
        )

    def _apply_limit(self, record: ProjectLimitRecord) -> None:
        key = (record["project"], record["route"])
        if record["rate"] is None or record["burst"] is None:
            self._limits.pop(key, None)
            return
        try:
            self._limits[key] = Limit(float(record["rate"]), int(record["burst"]))
        except (TypeError, ValueError):
            log.warning("ignoring invalid limit for %s/%s", *key)

    def limit_override(self, project: str, route: str) -> Limit | None:
        """The project's own limit on `route`, if `millimetric keys limits` set one."""
        return self._limits.get((project, route))

    def forget_status(self, project: str, forget_id: str) -> ForgetStatusRecord | None:
        """A finished forget of this project (None while pending, or for another project's id)."""
        status = self._forgets.get(forget_id)
        return status if status is not None and status["project"] == project else None

    def origin_known(self, origin: str) -> bool:
        """Whether any pk_ key allows this Origin (answers CORS preflights, which carry no key)."""
        return origin in self._origins

    def authenticate(self, authorization: str | None, origin: str | None, route: str) -> Principal:
        """Resolve a Bearer header to a principal allowed on `route`, or raise AuthError."""
        if not authorization:
            raise AuthError("missing_api_key")
        scheme, _, raw = authorization.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not KEY_FORMAT.fullmatch(raw):
            raise AuthError("malformed_api_key")
        if not self.loaded.is_set():
            # Not yet known is not unknown: 401 is final to clients, so ask them to come back.
            raise AuthError("keys_loading", KEYS_LOADING_RETRY_AFTER)
        digest = hash_api_key(raw)
        record = self._keys.get(digest)
        # The dict lookup is by hash; compare_digest keeps the final check constant-time.
        if record is None and self.lagging():
            raise AuthError("keys_loading", KEYS_LOADING_RETRY_AFTER)  # perhaps just created
        if record is None or not hmac.compare_digest(record["key_hash"], digest):
            raise AuthError("invalid_api_key")
        kinds, refusal = ROUTE_KINDS[route]
        if record["kind"] not in kinds:
            raise AuthError(refusal)
        if record["kind"] == "pk" and (origin is None or origin not in record["origins"]):
            raise AuthError("origin_not_allowed")
        return Principal(record["project"], record["kind"], record["prefix"], record["env"])

    async def stop(self) -> None:
        """Stop following the topic."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._reader.stop()
