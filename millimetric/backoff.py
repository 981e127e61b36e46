"""How long the sender waits before retrying: the policy shape of ingest/retry.py, without tenacity.

Capped exponential backoff with full jitter, as tenacity's `wait_random_exponential` (what the
stages use), so many clients retrying one gateway spread out. A `Retry-After` from the gateway
wins over the backoff: the wait is that long plus up to a fifth more, so clients refused together
do not come back together.
"""

from __future__ import annotations

import random

FIRST_S = 0.1
MAX_S = 10.0
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})  # the request may succeed unchanged


def delay_s(attempt: int, retry_after: float | None) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry)."""
    if retry_after is not None:
        return retry_after * (1 + random.uniform(0, 0.2))
    return random.uniform(0, min(MAX_S, FIRST_S * 2**attempt))
