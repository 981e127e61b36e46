"""Retry policy of every loop that waits for a broker, ClickHouse or Redis to come back.

One tenacity policy: exponential backoff with full jitter, capped; each retry is logged with its
error and counted in `millimetric_retries_total{operation}`. Errors a caller names as permanent
are not retried: they are raised at once (the caller dead-letters or reports them). An error with a
`retry_after_s` (a server's Retry-After) waits at least that long, capped at `max_delay_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_random_exponential,
)

from ingest.metrics import GAVE_UP, RETRIES

T = TypeVar("T")
log = logging.getLogger(__name__)


def _wait(first_delay_s: float, max_delay_s: float) -> Callable[[RetryCallState], float]:
    backoff = wait_random_exponential(multiplier=first_delay_s, max=max_delay_s)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        asked = getattr(error, "retry_after_s", None) or 0.0
        return max(backoff(state), min(float(asked), max_delay_s))

    return wait


def _log_retry(operation: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        RETRIES.labels(operation).inc()
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s failed (attempt %d: %r); retrying in %.1fs",
            operation,
            state.attempt_number,
            error,
            delay,
        )

    return before_sleep


async def retrying(
    operation: str,
    call: Callable[[], Awaitable[T]],
    *,
    permanent: Callable[[BaseException], bool] = lambda _: False,
    max_delay_s: float = 30.0,
    first_delay_s: float = 0.2,
    attempts: int | None = None,
) -> T:
    """Await `call()` until it succeeds, backing off between failures.

    `permanent(error)` true: raise at once. `attempts` bounds the tries (None: until it works,
    for faults that heal, such as a server being down); past the bound the last error is raised
    and counted in `millimetric_retries_exhausted_total`.
    """
    policy = AsyncRetrying(
        # Cancellation (a BaseException) is an order to stop, never a fault to retry.
        retry=retry_if_exception(lambda e: isinstance(e, Exception) and not permanent(e)),
        wait=_wait(first_delay_s, max_delay_s),
        stop=stop_never if attempts is None else stop_after_attempt(attempts),
        before_sleep=_log_retry(operation),
        reraise=True,
    )

    # tenacity awaits only what an `async def` returns; a lambda's coroutine would never run.
    async def attempt() -> T:
        return await call()

    try:
        return await policy(attempt)
    except Exception as error:
        if attempts is not None and not permanent(error):
            GAVE_UP.labels(operation).inc()
        raise
