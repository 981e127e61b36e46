"""The one retry policy: backs off and counts, raises permanent errors at once, bounded."""

from __future__ import annotations

import asyncio

import pytest

from ingest.metrics import GAVE_UP, RETRIES
from ingest.retry import retrying


def _count(counter: object, operation: str) -> float:
    return counter.labels(operation)._value.get()  # type: ignore[attr-defined]


async def test_a_fault_that_heals_is_retried_and_counted() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("down")
        return "up"

    # A lambda returning the coroutine, as callers pass arguments.
    assert await retrying("heals", lambda: flaky(), first_delay_s=0.001) == "up"
    assert calls == 3
    assert _count(RETRIES, "heals") == 2


async def test_a_permanent_error_is_raised_at_once() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        await retrying("refused", refused, permanent=lambda e: isinstance(e, ValueError))
    assert calls == 1
    assert _count(RETRIES, "refused") == 0

    with pytest.raises(ValueError):
        await retrying("refused", refused, attempts=3, permanent=lambda e: True)
    assert _count(GAVE_UP, "refused") == 0


async def test_bounded_attempts_give_up_with_the_last_error() -> None:
    calls = 0

    async def never() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"down {calls}")

    with pytest.raises(ConnectionError, match="down 3"):
        await retrying("never", never, attempts=3, first_delay_s=0.001)
    assert calls == 3
    assert _count(GAVE_UP, "never") == 1


async def test_a_lambda_returning_an_awaitable_is_awaited_and_retried() -> None:
    calls = 0

    async def flaky(value: str) -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise ConnectionError("down")
        return value

    assert await retrying("lambda", lambda: flaky("up"), first_delay_s=0.001) == "up"
    assert calls == 2


async def test_cancellation_is_not_retried() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(retrying("cancelled", forever, first_delay_s=0.001))
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()  # not caught and retried as a failure
