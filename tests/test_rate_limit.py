"""Token-bucket limiter tests: memory limiter, Redis limiter on a real redis-server, limits.toml."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rate_limit import (
    Decision,
    Limit,
    LimitsConfigError,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    load_default_limits,
)
from tests.redis_service import RedisServer, running_redis

# Generous: the bound proves "does not hang on a dead store", it is not a performance claim.
OUTAGE_BOUND_S = 1.0
# Correctness tests must not fail open (a timed-out check is allowed): a loaded CI box ran 100
# concurrent checks past a 2 s timeout once and let 37 through a bucket of 30.
SLOW_OK_TIMEOUT = 30.0


class FakeClock:
    """A manually advanced monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def project() -> str:
    """A unique project id, so tests never share buckets (also on an external Redis)."""
    return f"p-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """Both implementations, for the behaviours they must share."""
    if request.param == "memory":
        yield MemoryRateLimiter()
        return
    server: RedisServer = request.getfixturevalue("redis_server")  # sync, so allowed here
    lim = RedisRateLimiter(server.url, timeout=SLOW_OK_TIMEOUT)
    yield lim
    await lim.close()


async def drain(lim: RateLimiter, proj: str, route: str, limit: Limit, n: int) -> list[Decision]:
    return [await lim.check(proj, route, limit) for _ in range(n)]


# --- shared behaviour (memory and Redis) -------------------------------------------------


async def test_burst_exactly_allowed_then_denied(limiter: RateLimiter) -> None:
    limit = Limit(rate=0.01, burst=5)  # negligible refill during the test
    decisions = await drain(limiter, project(), "track", limit, 7)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert all(d.retry_after == 0.0 for d in decisions[:5])
    assert decisions[5].remaining == 0


async def test_retry_after_is_computed_from_the_bucket(limiter: RateLimiter) -> None:
    # 5 s per token: the bucket stays empty however slow the machine is between the checks.
    limit = Limit(rate=0.2, burst=2)
    proj = project()
    await drain(limiter, proj, "track", limit, 2)
    start_first = time.monotonic()
    first = await limiter.check(proj, "track", limit)
    end_first = time.monotonic()
    assert not first.allowed
    # Empty bucket: (1 - tokens) / rate = 5 s, minus the little time already elapsed.
    assert 0.0 < first.retry_after <= 5.0 + 1e-9
    await asyncio.sleep(0.3)
    start_later = time.monotonic()
    later = await limiter.check(proj, "track", limit)
    end_later = time.monotonic()
    assert not later.allowed
    # The wait shrinks by exactly the time between the two checks, which lies between the
    # gap and the span measured around them (5 ms for Redis' clock against ours).
    shrunk = first.retry_after - later.retry_after
    assert start_later - end_first - 0.005 <= shrunk <= end_later - start_first + 0.005


async def test_refill_over_time(limiter: RateLimiter) -> None:
    limit = Limit(rate=20.0, burst=4)
    proj = project()
    await drain(limiter, proj, "track", limit, 4)
    assert not (await limiter.check(proj, "track", limit)).allowed
    await asyncio.sleep(0.12)  # ~2.4 tokens at 20/s
    refilled = await drain(limiter, proj, "track", limit, 6)
    allowed = sum(d.allowed for d in refilled)
    assert 1 <= allowed <= 4  # generous: sleep overshoot only adds tokens, capped at burst
    await asyncio.sleep(0.5)  # long enough to refill completely, never beyond the burst
    full = await drain(limiter, proj, "track", limit, 8)
    assert 4 <= sum(d.allowed for d in full) <= 5  # burst, plus at most a token refilled meanwhile


async def test_buckets_are_separate_per_project_and_route(limiter: RateLimiter) -> None:
    limit = Limit(rate=0.01, burst=2)
    a, b = project(), project()
    await drain(limiter, a, "track", limit, 3)
    assert not (await limiter.check(a, "track", limit)).allowed
    assert (await limiter.check(a, "identify", limit)).allowed
    assert (await limiter.check(b, "track", limit)).allowed


async def test_cost_takes_several_tokens(limiter: RateLimiter) -> None:
    limit = Limit(rate=0.01, burst=5)
    proj = project()
    assert (await limiter.check(proj, "batch", limit, cost=3)).remaining == 2
    denied = await limiter.check(proj, "batch", limit, cost=3)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(1 / 0.01, rel=0.05)  # (3 - 2) / rate
    with pytest.raises(ValueError, match="cost"):
        await limiter.check(proj, "batch", limit, cost=6)


# --- memory limiter -----------------------------------------------------------------------


async def test_memory_retry_after_exact_with_fake_clock() -> None:
    clock = FakeClock()
    lim = MemoryRateLimiter(clock=clock)
    limit = Limit(rate=2.0, burst=1)
    assert (await lim.check("p", "track", limit)).allowed
    clock.now += 0.3  # 0.6 tokens back
    denied = await lim.check("p", "track", limit)
    assert denied == Decision(False, pytest.approx(0.2), 0)
    clock.now += 0.2
    assert (await lim.check("p", "track", limit)).allowed


async def test_memory_bucket_count_is_bounded() -> None:
    clock = FakeClock()
    lim = MemoryRateLimiter(max_buckets=100, clock=clock)
    limit = Limit(rate=1.0, burst=10)
    for i in range(10_000):
        await lim.check(f"p{i}", "track", limit)
        assert len(lim) <= 100
    assert len(lim) == 100


async def test_memory_drops_full_buckets_without_losing_state() -> None:
    clock = FakeClock()
    lim = MemoryRateLimiter(max_buckets=1000, clock=clock)
    limit = Limit(rate=1.0, burst=3)
    for i in range(50):
        await lim.check(f"idle{i}", "track", limit)
    await drain(lim, "busy", "track", limit, 3)
    clock.now += 1.5  # idle buckets (2 tokens left) are full again; "busy" has 1.5 tokens
    assert (await lim.check("busy", "track", limit)).allowed
    assert len(lim) == 1  # the full idle buckets were swept; "busy" kept its state...
    assert not (await lim.check("busy", "track", limit)).allowed  # ...0.5 tokens left


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0.0, 0.5), st.integers(1, 3)), min_size=1, max_size=80),
    rate=st.floats(0.5, 20.0),
    burst=st.integers(3, 20),
)
async def test_memory_never_allows_more_than_burst_plus_refill(
    steps: list[tuple[float, int]], rate: float, burst: int
) -> None:
    clock = FakeClock()
    lim = MemoryRateLimiter(clock=clock)
    limit, start, spent = Limit(rate, burst), clock.now, 0
    for delay, cost in steps:
        clock.now += delay
        decision = await lim.check("p", "track", limit, cost=cost)
        spent += cost if decision.allowed else 0
        assert spent <= burst + (clock.now - start) * rate + 1e-9
        # A denial's retry_after is exactly the wait after which the same request fits.
        if not decision.allowed:
            clock.now += decision.retry_after + 1e-9
            assert (await lim.check("p", "track", limit, cost=cost)).allowed
            spent += cost


# --- Redis limiter ------------------------------------------------------------------------


async def test_redis_key_naming_and_expiry(redis_server: RedisServer) -> None:
    lim = RedisRateLimiter(redis_server.url, timeout=SLOW_OK_TIMEOUT)
    client = aioredis.Redis.from_url(redis_server.url)
    proj = project()
    try:
        await lim.check(proj, "track", Limit(rate=10.0, burst=5), cost=2)
        ttl_ms = await client.pttl(f"mm:rl:{proj}:track")
    finally:
        await lim.close()
        await client.aclose()
    # Expires when full again: 2 tokens at 10/s = 200 ms.
    assert 0 < ttl_ms <= 200


async def test_two_replicas_share_one_bucket(redis_server: RedisServer) -> None:
    replicas = [RedisRateLimiter(redis_server.url, timeout=SLOW_OK_TIMEOUT) for _ in range(2)]
    limit, proj = Limit(rate=0.001, burst=30), project()
    try:
        decisions = await asyncio.gather(
            *(replicas[i % 2].check(proj, "track", limit) for i in range(100))
        )
    finally:
        for r in replicas:
            await r.close()
    assert sum(d.allowed for d in decisions) == 30


_CHILD = """
import asyncio, sys
from gateway.rate_limit import Limit, RedisRateLimiter

async def main() -> None:
    lim = RedisRateLimiter(sys.argv[1], timeout=30.0)
    limit = Limit(rate=0.001, burst=40)
    sys.stdin.readline()  # start together with the parent
    ds = await asyncio.gather(*(lim.check(sys.argv[2], "track", limit) for _ in range(60)))
    await lim.close()
    print(sum(d.allowed for d in ds))

asyncio.run(main())
"""


async def test_replica_in_another_process_shares_the_bucket(redis_server: RedisServer) -> None:
    proj = project()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, redis_server.url, proj,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lim = RedisRateLimiter(redis_server.url, timeout=SLOW_OK_TIMEOUT)
    limit = Limit(rate=0.001, burst=40)
    try:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        ours = await asyncio.gather(*(lim.check(proj, "track", limit) for _ in range(60)))
        out, _ = await asyncio.wait_for(child.communicate(), timeout=30)
    finally:
        await lim.close()
    assert child.returncode == 0
    theirs = int(out.decode().strip())
    assert sum(d.allowed for d in ours) + theirs == 40


async def test_redis_outage_fails_open_then_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A refused connection fails at once; the long timeout keeps a slow but live Redis from
    # passing for the outage after the restart.
    fail_open = RedisRateLimiter(redis_server.url, probe_interval=0.1, timeout=SLOW_OK_TIMEOUT)
    fail_closed = RedisRateLimiter(
        redis_server.url, fail_open=False, probe_interval=0.1, timeout=SLOW_OK_TIMEOUT
    )
    limit = Limit(rate=0.01, burst=3)
    proj = project()
    try:
        assert (await fail_open.check(proj, "track", limit)).allowed  # pool has a connection
        redis_server.stop()
        caplog.set_level(logging.WARNING, logger="gateway.rate_limit")
        for _ in range(20):
            started = time.monotonic()
            opened = await fail_open.check(proj, "track", limit)
            closed = await fail_closed.check(proj, "track", limit)
            assert time.monotonic() - started < OUTAGE_BOUND_S
            assert opened == Decision(True, 0.0, 0)
            assert not closed.allowed
            assert closed.retry_after == pytest.approx(1 / 0.01)
            await asyncio.sleep(0.01)
        # ~20 failures each, yet one warning per limiter: no log flood.
        warnings = [r for r in caplog.records if r.name == "gateway.rate_limit"]
        assert [r.levelno for r in warnings] == [logging.WARNING] * 2

        redis_server.start()  # empty: the restart lost the buckets and the script cache
        await asyncio.sleep(0.15)  # past probe_interval
        for lim in (fail_open, fail_closed):
            got = await drain(lim, proj, "track", limit, 4)
            # A denial proves the answers come from Redis again, not from the fallback.
            assert [d.allowed for d in got] == [True, True, True, False]
            proj = project()
    finally:
        redis_server.start()  # the module's server, whatever happened (a no-op when running)
        await fail_open.close()
        await fail_closed.close()


async def test_slow_redis_times_out_and_connection_is_not_poisoned(
    redis_server: RedisServer,
) -> None:
    # Margins for a loaded machine: a live Redis answers within 0.5 s; a busy Lua loop blocks
    # the single-threaded server for 4 s (a real "slow Redis"), started 1 s before the check,
    # so only the timeout can end that check within 2 s.
    lim = RedisRateLimiter(redis_server.url, timeout=0.5, probe_interval=0.0)
    blocker = aioredis.Redis.from_url(redis_server.url)
    limit, proj = Limit(rate=0.01, burst=3), project()
    busy = (
        "local function us() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end "
        "local t0 = us() while us() - t0 < 4000000 do end"
    )
    try:
        assert (await lim.check(proj, "track", limit)).remaining == 2
        task = asyncio.create_task(blocker.eval(busy, 0))
        await asyncio.sleep(1.0)
        started = time.monotonic()
        assert (await lim.check(proj, "track", limit)) == Decision(True, 0.0, 0)
        assert time.monotonic() - started < 2.0
        await task
        # A stale reply left on a reused socket would answer for the old project (remaining
        # <= 1); a fresh bucket must report its own state.
        assert (await lim.check(project(), "track", limit)).remaining == 2
        # The timed-out check may or may not have reached the server before it was dropped.
        assert (await lim.check(proj, "track", limit)).remaining in (0, 1)
    finally:
        await lim.close()
        await blocker.aclose()


# --- limits.toml ----------------------------------------------------------------------------


def test_default_limits_load() -> None:
    limits = load_default_limits()
    assert limits["track"] == Limit(50.0, 200)
    assert limits["batch"] == Limit(5.0, 20)
    assert set(limits) == {
        "track",
        "batch",
        "identify",
        "forget",
        "hooks",
        "batch_historical",
        "read",
    }


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[track]\nrate = 50.0\n", "burst"),  # missing field
        ("[track]\nrate = 0\nburst = 10\n", "rate"),  # non-positive rate
        ("[track]\nrate = 5\nburst = 2.5\n", "burst"),  # fractional burst
        ("[track]\nrate = 5\nburst = 2\nburts = 3\n", "burts"),  # typo'd key
        ('[track]\nrate = "fast"\nburst = 2\n', "rate"),
        ('["Bad:Route"]\nrate = 5\nburst = 2\n', "Bad:Route"),  # would make keys ambiguous
        ("[track\nrate = 5\n", "invalid rate-limit table"),  # not TOML
        ("", "no routes"),
    ],
)
def test_bad_limits_table_gives_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(text)
    with pytest.raises(LimitsConfigError, match="invalid rate-limit table") as err:
        load_default_limits(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Limit(rate=0.0, burst=1)
    with pytest.raises(ValueError):
        Limit(rate=1.0, burst=0)
