"""A loopback SQL endpoint over the embedded store, for `millimetric sql` while a sink holds it.

chdb lets one process at a time open a data directory, so while the sink runs, other processes
query through it. It listens on 127.0.0.1 only and records its address in the data directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sinks.clickhouse import ClickHouse

ENDPOINT_FILE = "clickhouse.endpoint"


def _app(ch: ClickHouse) -> Starlette:
    async def query(request: Request) -> PlainTextResponse:
        sql = (await request.body()).decode()
        try:
            return PlainTextResponse(await asyncio.to_thread(ch.query_tsv, sql))
        except Exception as error:  # the client shows ClickHouse's message
            return PlainTextResponse(str(error), status_code=400)

    return Starlette(routes=[Route("/sql", query, methods=["POST"])])


async def serve(ch: ClickHouse, data_dir: Path, stop: asyncio.Event) -> None:
    """Serve queries until `stop` is set; the address goes to `<data_dir>/clickhouse.endpoint`."""
    server = uvicorn.Server(
        uvicorn.Config(_app(ch), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    marker = data_dir / ENDPOINT_FILE
    marker.write_text(f"http://127.0.0.1:{port}/sql\n")
    try:
        await stop.wait()
    finally:
        marker.unlink(missing_ok=True)
        server.should_exit = True
        await task
