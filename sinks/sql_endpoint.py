"""A loopback SQL endpoint over the embedded store, for `millimetric sql` while a sink holds it.

chdb lets one process at a time open a data directory, so while the sink runs, other processes
query through it. It listens on 127.0.0.1 only and records its address in the data directory.
Loopback is not a boundary (any local process, and any web page through the browser, can reach
it), so a request must carry the token the sink writes to a 0600 file in the data directory,
name a loopback `Host` (DNS rebinding sends the attacker's name), stay under a size bound, and
be one read query unless it asks for write (`millimetric sql --write`).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import re
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sinks.clickhouse import ClickHouse, Features, parse_version

ENDPOINT_FILE = "clickhouse.endpoint"
TOKEN_FILE = "clickhouse.token"
WRITE_HEADER = "x-millimetric-write"
MAX_QUERY_BYTES = 1024 * 1024
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
# Outside quotes and comments: a word, or a `;`. Quoted parts and comments are skipped whole.
_TOKEN = re.compile(
    r"""'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`"""
    r"|--[^\n]*|\#[^\n]*|/\*.*?\*/|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<semicolon>;)",
    re.S,
)


class SqlRefused(Exception):
    """The endpoint refused a query (or ClickHouse did); the message says why."""


def read_only_refusal(sql: str) -> str | None:
    """Why `sql` is not one read query (None when it is)."""
    words: list[str] = []
    for match in _TOKEN.finditer(sql):
        if match["semicolon"]:
            words.append(";")
        elif match["word"]:
            words.append(match["word"].upper())
    if not words or words[0] not in READ_STATEMENTS:
        return "only read queries (SELECT, WITH, SHOW, DESCRIBE, EXISTS, EXPLAIN) without --write"
    if ";" in words[:-1]:
        return "one statement at a time without --write"
    if any(a == "INTO" and b == "OUTFILE" for a, b in itertools.pairwise(words)):
        return "INTO OUTFILE writes a file: use --write"
    return None


def _refuse(status: int, message: str) -> PlainTextResponse:
    return PlainTextResponse(message, status_code=status)


def _app(ch: ClickHouse, token: str, port: list[int]) -> Starlette:
    async def query(request: Request) -> PlainTextResponse:
        if request.headers.get("host") not in {f"{h}:{port[0]}" for h in LOOPBACK_HOSTS}:
            return _refuse(403, "Host must be this endpoint's loopback address")
        offered = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(offered.encode(), token.encode()):
            return _refuse(401, f"a token from the data directory's {TOKEN_FILE} is required")
        declared = request.headers.get("content-length", "")
        if not declared.isdigit() or int(declared) > MAX_QUERY_BYTES:
            return _refuse(413, f"a query is at most {MAX_QUERY_BYTES} bytes, with Content-Length")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_QUERY_BYTES:
                return _refuse(413, f"a query is at most {MAX_QUERY_BYTES} bytes")
        sql = body.decode("utf-8", "replace")
        if request.headers.get(WRITE_HEADER) != "true":
            if refusal := read_only_refusal(sql):
                return _refuse(403, refusal)
            sql = f"{sql.rstrip().removesuffix(';')}\nSETTINGS readonly = 1"
        try:
            return PlainTextResponse(await asyncio.to_thread(ch.query_tsv, sql))
        except Exception as error:  # the client shows ClickHouse's message
            return _refuse(400, str(error))

    return Starlette(routes=[Route("/sql", query, methods=["POST"])])


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only this user can read (an existing file is narrowed first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


async def serve(ch: ClickHouse, data_dir: Path, stop: asyncio.Event) -> None:
    """Serve queries until `stop` is set; the address goes to `<data_dir>/clickhouse.endpoint`,
    a fresh token to `<data_dir>/clickhouse.token` (mode 0600)."""
    token = secrets.token_urlsafe(32)
    port: list[int] = []  # known once the socket is bound
    server = uvicorn.Server(
        uvicorn.Config(
            _app(ch, token, port), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    port.append(server.servers[0].sockets[0].getsockname()[1])
    _write_private(data_dir / TOKEN_FILE, token)
    marker = data_dir / ENDPOINT_FILE
    marker.write_text(f"http://127.0.0.1:{port[0]}/sql\n")
    try:
        await stop.wait()
    finally:
        marker.unlink(missing_ok=True)
        (data_dir / TOKEN_FILE).unlink(missing_ok=True)
        server.should_exit = True
        await task


def query_endpoint(data_dir: Path, sql: str, *, write: bool = False, timeout: float = 60) -> str:
    """Run `sql` through the running sink's endpoint; SqlRefused with its message, OSError when
    no sink serves (no endpoint file, or a stale one)."""
    url = (data_dir / ENDPOINT_FILE).read_text().strip()
    token = (data_dir / TOKEN_FILE).read_text().strip()
    headers = {"authorization": f"Bearer {token}", "content-type": "text/plain"}
    if write:
        headers[WRITE_HEADER] = "true"
    request = urllib.request.Request(url, data=sql.encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as error:
        raise SqlRefused(error.read().decode()) from None


class EndpointClickHouse:
    """The embedded store a running sink holds, through its endpoint: the surface of a
    ClickHouse that statements need (no inserts of Python data)."""

    def __init__(self, data_dir: Path) -> None:
        """Reach the sink serving `data_dir`; OSError when none does."""
        self._data_dir = data_dir
        self.database = "default"
        self.cluster: str | None = None
        self.description = f"embedded chdb at {data_dir} (through the running sink)"
        self.features = Features(parse_version(self.query_tsv("SELECT version()")))

    def execute(self, sql: str) -> None:
        """Run a statement."""
        query_endpoint(self._data_dir, sql, write=True)

    def query_tsv(self, sql: str) -> str:
        """Run a read query; its rows as TSV."""
        return query_endpoint(self._data_dir, sql)

    def query_every_replica(self, sql: str) -> list[str]:
        """Run a read query on the one replica there is."""
        return [self.query_tsv(sql)]

    def close(self) -> None:
        """Nothing to release: the sink holds the store."""
