"""Millimetric's Python client: `millimetric.track(...)` with MILLIMETRIC_HOST / MILLIMETRIC_KEY
set, or a `Client` (threads) / `AsyncClient` (asyncio) of your own. See the README's "Sending
from Python"."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any

from millimetric.client import Client
from millimetric.messages import Failure, FlushResult, RejectedError

__all__ = [
    "Client",
    "Failure",
    "FlushResult",
    "RejectedError",
    "close",
    "default_client",
    "flush",
    "forget",
    "identify",
    "track",
]

_default: Client | None = None
_lock = threading.Lock()


def default_client() -> Client:
    """The module's client, made on first use from MILLIMETRIC_HOST and MILLIMETRIC_KEY."""
    global _default
    client = _default
    if client is None:
        with _lock:
            if _default is None:
                key = os.environ.get("MILLIMETRIC_KEY", "")
                if not key:
                    raise RuntimeError("set MILLIMETRIC_KEY (and MILLIMETRIC_HOST) first")
                host = os.environ.get("MILLIMETRIC_HOST", "http://127.0.0.1:8787")
                _default = Client(host, key)
            client = _default
    return client


def track(event: str, properties: dict[str, Any] | None = None, **fields: Any) -> str:
    """`Client.track` on the default client."""
    return default_client().track(event, properties, **fields)


def identify(anonymous_id: str, user_id: str, traits: dict[str, Any] | None = None) -> None:
    """`Client.identify` on the default client."""
    default_client().identify(anonymous_id, user_id, traits)


def forget(user_id: str | None = None, anonymous_id: str | None = None) -> Future[str]:
    """`Client.forget` on the default client."""
    return default_client().forget(user_id, anonymous_id)


def flush(timeout: float | None = None) -> FlushResult:
    """`Client.flush` on the default client."""
    return default_client().flush(timeout)


def close(timeout: float | None = None) -> FlushResult:
    """`Client.close` on the default client; the next call makes a new one."""
    global _default
    with _lock:
        client, _default = _default, None
    return client.close(timeout) if client else FlushResult(0, 0, 0)
