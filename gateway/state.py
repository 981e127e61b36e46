"""The state one gateway process holds, shared by its endpoints: key store, hooks, limiter,
validator and producer. Its own module so that the endpoints (`endpoints.py`, `hooks.py`,
`read_api.py`) and the app that wires them (`app.py`) do not import each other.
"""

from __future__ import annotations

from gateway.auth import KeyStore
from gateway.client_context import ClientContext
from gateway.hook_table import HookTable
from gateway.publish import Publisher
from gateway.rate_limit import (
    InvalidRequestBudget,
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    load_default_limits,
)
from gateway.validate import Validator
from ingest.kafka_connection import client_options, security_options
from ingest.metrics import set_serving
from ingest.settings import Settings
from ingest.topics import ensure_topics, require


class Gateway:
    """The state one gateway process holds: key store, limiter, producer."""

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.kafka = client_options(settings, bootstrap)
        self.hooks = HookTable()
        self.keys = KeyStore(self.kafka, {"hook": self.hooks.apply})
        self.publisher = Publisher(
            self.kafka,
            idempotence=settings.kafka_idempotence,
            linger_ms=settings.kafka_linger_ms,
            compression=settings.kafka_compression,
            timeout_s=settings.publish_timeout_s,
        )
        self.validator = Validator(
            settings.properties_max_bytes,
            settings.batch_max_events,
            settings.timestamp_max_age_days,
            settings.timestamp_max_future_s,
        )
        self.context = ClientContext(settings.trusted_proxies, settings.edge_country_header)
        self.limits: dict[str, Limit] = load_default_limits()
        self.limiter: RateLimiter = (
            RedisRateLimiter(settings.redis_url, fail_open=settings.rate_limit_fail_open)
            if settings.redis_url
            else MemoryRateLimiter()
        )
        self.invalid_budget = InvalidRequestBudget(
            self.limiter, Limit(settings.invalid_request_rate, settings.invalid_request_burst)
        )
        raw, forgets = require("raw", "forgets")
        self.raw_topic, self.forget_topic = raw.name, forgets.name
        self.retry_after = str(max(1, round(settings.publish_timeout_s)))

    def limit_for(self, route: str, project: str) -> Limit:
        """The project's limit on `route`: its override from the keys topic, else the default."""
        return self.keys.limit_override(project, route) or self.limits[route]

    async def start(self) -> None:
        """Create missing topics, connect the producer, start following the keys topic."""
        s = self.settings
        await ensure_topics(
            self.bootstrap,
            s.kafka_replication_factor,
            min_insync_replicas=s.kafka_min_insync_replicas,
            security=security_options(s),
        )
        await self.publisher.start()
        await self.keys.start()
        set_serving("gateway", True)

    async def stop(self) -> None:
        """Stop in reverse order."""
        set_serving("gateway", False)
        await self.keys.stop()
        await self.publisher.stop()
        await self.limiter.close()
