"""Read-only access to ClickHouse for the read API: a server directly, or chdb through its sink.

With `MILLIMETRIC_CLICKHOUSE_URL`, clickhouse-driver connects to the server as a read-only
session (`readonly = 2`: no writes, settings allowed) with `max_execution_time`. Embedded chdb
lets one process open the store, the sink, which serves SQL on a token-protected loopback
endpoint; the gateway reads its address and token from the data directory at each query (a
restarted sink writes new ones). Rows come back as lists of strings either way.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import httpx

from ingest.settings import Settings

# The files the sink's SQL endpoint writes into the data directory (sinks/sql_endpoint.py).
ENDPOINT_FILE = "clickhouse.endpoint"
TOKEN_FILE = "clickhouse.token"
POOL_SIZE = 4  # idle driver connections kept; more concurrent reads open more
_TSV_ESCAPE = re.compile(r"\\(.)")
_TSV_CHARS = {"t": "\t", "n": "\n", "r": "\r", "0": "\0", "b": "\b", "f": "\f"}


class StoreUnavailable(Exception):
    """ClickHouse did not answer the read; the message says why (logged, never shown)."""


class Reader(Protocol):
    """Runs one read query; rows as lists of strings."""

    async def rows(self, sql: str) -> list[list[str]]: ...

    async def close(self) -> None: ...


def parse_tsv(text: str) -> list[list[str]]:
    """TabSeparated output as rows of unescaped strings."""
    unescape = lambda m: _TSV_CHARS.get(m[1], m[1])  # noqa: E731 - one-line mapping
    return [
        [_TSV_ESCAPE.sub(unescape, field) for field in line.split("\t")]
        for line in text.split("\n")
        if line
    ]


class ServerReader:
    """The ClickHouse server over the native protocol, a small pool of read-only clients."""

    def __init__(self, settings: Settings) -> None:
        assert settings.clickhouse_url
        parsed = urlparse(settings.clickhouse_url)
        secure = settings.clickhouse_secure
        password = settings.clickhouse_password
        self._options: dict[str, Any] = dict(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or (9440 if secure else 9000),
            database=parsed.path.lstrip("/") or "default",
            user=unquote(parsed.username or "default"),
            password=password.get_secret_value() if password else "",
            secure=secure,
            verify=True,
            ca_certs=str(settings.clickhouse_ca_certs) if settings.clickhouse_ca_certs else None,
            connect_timeout=5,
            send_receive_timeout=settings.read_timeout_s + 5,
            settings={"readonly": 2, "max_execution_time": settings.read_timeout_s},
        )
        self._idle: list[Any] = []

    def _run(self, sql: str) -> list[list[str]]:
        from clickhouse_driver import Client

        client = self._idle.pop() if self._idle else Client(**self._options)
        try:
            rows = client.execute(sql)
        except Exception as error:
            client.disconnect()
            raise StoreUnavailable(str(error)) from None
        if len(self._idle) < POOL_SIZE:
            self._idle.append(client)
        else:
            client.disconnect()
        return [[str(value) for value in row] for row in rows]

    async def rows(self, sql: str) -> list[list[str]]:
        """Run `sql` on a pooled client in a thread (the driver blocks)."""
        return await asyncio.to_thread(self._run, sql)

    async def close(self) -> None:
        """Disconnect the idle clients."""
        while self._idle:
            self._idle.pop().disconnect()


class EndpointReader:
    """Embedded chdb, through the running sink's loopback SQL endpoint (read queries only)."""

    def __init__(self, data_dir: Path, timeout_s: float) -> None:
        self._data_dir = data_dir
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def rows(self, sql: str) -> list[list[str]]:
        """POST `sql` with the sink's token; StoreUnavailable when no sink serves or it fails."""
        try:
            url = (self._data_dir / ENDPOINT_FILE).read_text().strip()
            token = (self._data_dir / TOKEN_FILE).read_text().strip()
            response = await self._client.post(
                url, content=sql.encode(), headers={"authorization": f"Bearer {token}"}
            )
        except (OSError, httpx.HTTPError) as error:
            raise StoreUnavailable(f"no sink SQL endpoint answers: {error!r}") from None
        if response.status_code != 200:
            raise StoreUnavailable(f"{response.status_code}: {response.text[:500]}")
        return parse_tsv(response.text)

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def open_reader(settings: Settings) -> Reader:
    """The configured store's reader: the server when `clickhouse_url` is set, else the sink."""
    if settings.clickhouse_url:
        return ServerReader(settings)
    return EndpointReader(settings.data_dir, settings.read_timeout_s)
