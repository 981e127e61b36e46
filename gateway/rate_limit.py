"""Token-bucket rate limiting per (project, route), in process memory or shared through Redis.

When Redis is down or slow, ``RedisRateLimiter`` fails OPEN by default (``fail_open=False``
fails closed): an analytics ingest would rather accept traffic than drop it because its limiter
store is unavailable, and the broker behind the gateway is the real overload protection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger(__name__)

DEFAULT_LIMITS_PATH = Path(__file__).with_name("limits.toml")


@dataclass(frozen=True, slots=True)
class Limit:
    """A bucket refilling ``rate`` tokens per second up to ``burst`` tokens."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        # A zero/negative/NaN rate would divide by zero or never refill.
        if not (math.isfinite(self.rate) and self.rate > 0) or self.burst < 1:
            raise ValueError(f"invalid limit: rate={self.rate!r} burst={self.burst!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of one check: ``retry_after`` is the time until the request would fit."""

    allowed: bool
    retry_after: float
    remaining: int


class LimitsConfigError(ValueError):
    """The limits table is not valid TOML or does not match the expected schema."""


class _LimitModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rate: float = Field(gt=0, allow_inf_nan=False)
    burst: int = Field(ge=1)


# Route names end the Redis key, so they must not contain ':' (keeps keys unambiguous).
_Route = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
_TABLE = TypeAdapter(dict[_Route, _LimitModel])


def load_default_limits(path: Path | None = None) -> dict[str, Limit]:
    """Load ``route -> Limit`` from a TOML table (the packaged ``limits.toml`` by default).

    Raises ``LimitsConfigError`` naming the file and the offending fields on a bad table.
    """
    path = path or DEFAULT_LIMITS_PATH
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        table = _TABLE.validate_python(raw)
    except tomllib.TOMLDecodeError as exc:
        raise LimitsConfigError(f"invalid rate-limit table {path}: {exc}") from exc
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise LimitsConfigError(f"invalid rate-limit table {path}: {errors}") from exc
    if not table:
        raise LimitsConfigError(f"invalid rate-limit table {path}: no routes defined")
    return {route: Limit(m.rate, m.burst) for route, m in table.items()}


class RateLimiter(Protocol):
    """What the gateway needs from a limiter."""

    async def check(self, project: str, route: str, limit: Limit, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from the (project, route) bucket if it holds enough."""

    async def close(self) -> None:
        """Release resources."""


def _check_cost(limit: Limit, cost: int) -> None:
    # A cost above the burst could never be allowed; that is a caller bug, not a denial.
    if not 1 <= cost <= limit.burst:
        raise ValueError(f"cost must be in [1, burst={limit.burst}], got {cost}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    full_at: float  # when the bucket will be full again, i.e. forgetting it loses nothing


class MemoryRateLimiter:
    """Buckets in this process only (one gateway replica), on a monotonic clock.

    At most ``max_buckets`` buckets are kept: buckets that have refilled completely are
    dropped (an absent bucket *is* a full one), and beyond the cap the least recently used
    bucket is evicted (worst case: that project gets a fresh burst early).
    """

    def __init__(
        self, *, max_buckets: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Create an empty limiter; ``clock`` is injectable for deterministic tests."""
        if max_buckets < 1:
            raise ValueError("max_buckets must be >= 1")
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """Number of buckets currently held."""
        return len(self._buckets)

    async def check(self, project: str, route: str, limit: Limit, cost: int = 1) -> Decision:
        """Take ``cost`` tokens if available; never awaits, so it is atomic on the loop."""
        _check_cost(limit, cost)
        now = self._clock()
        key = (project, route)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(limit.burst), now, now)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            decision = Decision(True, 0.0, math.floor(bucket.tokens))
        else:
            decision = Decision(False, (cost - bucket.tokens) / limit.rate, 0)
        bucket.full_at = now + (limit.burst - bucket.tokens) / limit.rate
        self._evict(now)
        return decision

    def _evict(self, now: float) -> None:
        # Oldest-first sweep: each bucket is removed at most once, so this is amortised O(1).
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if oldest.full_at > now and len(self._buckets) <= self._max_buckets:
                return
            self._buckets.popitem(last=False)

    async def close(self) -> None:
        """Drop all buckets."""
        self._buckets.clear()


class InvalidRequestBudget:
    """Invalid requests are not free: each costs a token of its sender's budget (a key; for a
    public pk_ key, a key and client IP), so nobody can make the gateway validate for nothing.

    The bucket lives in the limiter (shared through Redis when there is one). A sender whose
    bucket was found empty is refused before its next body is read, until the bucket would
    hold a token again; this process remembers that for at most ``max_senders`` senders.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        limit: Limit,
        *,
        max_senders: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = limiter
        self._limit = limit
        self._max_senders = max_senders
        self._clock = clock
        self._blocked: OrderedDict[tuple[str, str], float] = OrderedDict()

    def blocked_for(self, project: str, sender: str) -> float:
        """Seconds until `sender` may be heard again (0: now)."""
        until = self._blocked.get((project, sender))
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._blocked[(project, sender)]
            return 0.0
        return left

    async def charge(self, project: str, sender: str) -> Decision:
        """Take the token an invalid request costs; a refusal blocks the sender for a while."""
        decision = await self._limiter.check(project, f"invalid:{sender}", self._limit)
        if not decision.allowed:
            self._blocked[(project, sender)] = self._clock() + decision.retry_after
            self._blocked.move_to_end((project, sender))
            while len(self._blocked) > self._max_senders:
                self._blocked.popitem(last=False)
        return decision


# KEYS[1] = hash {tokens, ts (server time, us)}; ARGV = rate, burst, cost. Returns
# {allowed, remaining, retry_after}, the last as a string (Lua floats are truncated to ints).
_SCRIPT = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if not (tokens and ts) then
  tokens, ts = burst, now
elseif now > ts then -- a server clock stepping back never refills
  tokens, ts = math.min(burst, tokens + (now - ts) * rate / 1000000), now
end
local allowed, retry_after = 0, (cost - tokens) / rate
if tokens >= cost then
  tokens, allowed, retry_after = tokens - cost, 1, 0
end
local fmt = string.format
redis.call('HSET', KEYS[1], 'tokens', fmt('%.17g', tokens), 'ts', fmt('%.0f', ts))
-- an absent bucket is a full one; the cap (1 year) keeps PEXPIRE's argument a sane integer
local ttl = math.ceil((burst - tokens) * 1000 / rate)
redis.call('PEXPIRE', KEYS[1], math.max(1, math.min(ttl, 31536000000)))
return {allowed, math.floor(tokens), fmt('%.17g', retry_after)}
"""
# EVALSHA needs the script's SHA1, which is what SCRIPT LOAD would return; EVAL on NOSCRIPT
# (e.g. after a Redis restart flushed the script cache) loads it again.
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


class RedisRateLimiter:
    """Buckets shared by all gateway replicas through Redis (one atomic Lua script per check).

    The script reads the server clock (``TIME``), so replicas' clocks do not matter, and each
    key expires when its bucket would be full again. Keys are ``mm:rl:{project}:{route}``.
    Every check is bounded by ``timeout``; after a failure Redis is not tried again for
    ``probe_interval`` seconds (so an outage does not add ``timeout`` to every request), and
    a warning is logged at most once per ``warn_interval`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = True,
        timeout: float = 0.05,
        probe_interval: float = 0.5,
        warn_interval: float = 30.0,
    ) -> None:
        """Create a limiter for the Redis at ``url``; connections are opened lazily."""
        self._fail_open = fail_open
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._warn_interval = warn_interval
        # No client-side retries/backoff: the timeout bounds the whole check instead.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._skip_until = 0.0
        self._next_warning = 0.0
        self._failures = 0

    async def check(self, project: str, route: str, limit: Limit, cost: int = 1) -> Decision:
        """Take ``cost`` tokens atomically in Redis; on store failure fail open (or closed)."""
        _check_cost(limit, cost)
        if time.monotonic() < self._skip_until:
            return self._fallback(limit, cost)
        key = f"mm:rl:{project}:{route}"
        args = (limit.rate, limit.burst, cost)
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await self._redis.evalsha(_SCRIPT_SHA, 1, key, *args)
                except NoScriptError:
                    reply = await self._redis.eval(_SCRIPT, 1, key, *args)
        except (RedisError, OSError) as exc:  # builtin TimeoutError is an OSError
            # redis-py disconnects a connection whose command failed or was cancelled, so
            # the pool never hands out a socket with a stale reply: recovery is automatic.
            self._skip_until = time.monotonic() + self._probe_interval
            self._warn(exc)
            return self._fallback(limit, cost)
        if self._failures:
            log.info("rate-limit store is reachable again after %d failures", self._failures)
            self._failures = 0
        allowed, remaining, retry_after = reply
        return Decision(bool(allowed), float(retry_after), int(remaining))

    def _fallback(self, limit: Limit, cost: int) -> Decision:
        if self._fail_open:
            return Decision(True, 0.0, 0)
        # Fail closed: tell the client to come back after the time the request would cost.
        return Decision(False, cost / limit.rate, 0)

    def _warn(self, exc: BaseException) -> None:
        self._failures += 1  # counted for the recovery message
        now = time.monotonic()
        if now < self._next_warning:
            return
        self._next_warning = now + self._warn_interval
        mode = "open" if self._fail_open else "closed"
        log.warning("rate-limit store unavailable (%r); failing %s", exc, mode)

    async def close(self) -> None:
        """Close the Redis connection pool."""
        await self._redis.aclose()


def _route_label(name: str) -> str:
    if name == "read":  # one bucket for the read API's routes
        return "`GET /v1/stats`, `/v1/sources`, `/v1/events`"
    if name.endswith("_historical"):
        return f"`/v1/{name.removesuffix('_historical')}`, historical lane"
    return f"`/v1/{name}`"


def markdown_table(path: Path | None = None) -> str:
    """Render the default limits as the README shows them."""
    lines = ["| route | rate (requests/s) | burst |", "|---|---|---|"]
    lines += [
        f"| {_route_label(route)} | {limit.rate:g} | {limit.burst} |"
        for route, limit in load_default_limits(path).items()
    ]
    return "\n".join(lines)


HISTORICAL_LANE = ("x-millimetric-lane", "historical")  # the header backfills send


def limit_class(route: str, headers: dict[str, str], key_kind: str) -> str:
    """The bucket a request draws on: `<route>_historical` for a secret key's batch on the
    historical lane (so backfills never spend live traffic's budget), else the route's own."""
    name, value = HISTORICAL_LANE
    if route == "batch" and key_kind == "sk" and headers.get(name) == value:
        return "batch_historical"
    return route
