"""An open-loop HTTP load generator: `python -m bench.loadgen < spec.json` prints JSON.

wrk is closed-loop (each connection waits for its answer), so it cannot hold a fixed rate.
This sends request i at start + i/rate whatever happened before, over a pool of keep-alive
HTTP/1.1 connections (a new one when all are busy), and measures each latency from the
request's *scheduled* time, so a stall is not hidden (no coordinated omission).

Spec: {"url", "rate", "seconds", "body", "headers", "keys"}: the body's "%N%" becomes a request
counter, and request n carries `Bearer keys[n % len(keys)]` (limits are per project).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlparse

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    """Keep-alive connections to one host, and the results of the requests sent."""

    def __init__(self, url: str, headers: dict[str, str], body: str, keys: list[str]) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = f"POST {parsed.path} HTTP/1.1\r\nHost: {self.host}\r\n{head}"
        self.body = body
        self.keys = [f"Authorization: Bearer {k}\r\n" for k in keys] or [""]
        self.idle: list[Conn] = []
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.failures = 0

    def _request(self, n: int) -> bytes:
        body = self.body.replace("%N%", str(n)).encode()
        auth = self.keys[n % len(self.keys)]
        return f"{self.head}{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def send(self, n: int, scheduled: float) -> None:
        """Send request n and record its latency from `scheduled`."""
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        try:
            writer.write(self._request(n))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.failures += 1
            writer.close()
            return
        self.latencies.append(time.perf_counter() - scheduled)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.idle.append(conn)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Hold spec["rate"] requests/s for spec["seconds"]; return what happened."""
    client = Client(
        spec["url"], spec.get("headers", {}), spec.get("body", ""), spec.get("keys", [])
    )
    rate, total = float(spec["rate"]), int(spec["rate"] * spec["seconds"])
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for n in range(total):
        scheduled = start + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(client.send(n, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = time.perf_counter() - start
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    ms = [x * 1000 for x in client.latencies]
    return {
        "requests": total,
        "sent_rate": total / sent_for,
        "statuses": client.statuses,
        "failures": client.failures,
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms, default=float("nan")),
    }


def main() -> None:
    """Entry point: one JSON spec on stdin, one JSON result on stdout."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio still works, with more client overhead
        pass
    print(json.dumps(asyncio.run(run(json.load(sys.stdin)))))


if __name__ == "__main__":
    main()
