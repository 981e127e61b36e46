"""The gateway's baseline: a bare ASGI app that reads the body and produces it with raw aiokafka.

Same server (uvicorn, uvloop, httptools, no access log, no proxy headers), same producer
settings as the gateway (acks=all, linger, no idempotence on Tansu), and it answers 202 only
after the broker's ack.
No validation, no auth, no rate limit, no framework: what the gateway's work is measured against.
Run: `python -m bench.bare_gateway PORT BOOTSTRAP TOPIC LINGER_MS`.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from aiokafka import AIOKafkaProducer

ANSWER = b'{"ok":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"11")]


class BareApp:
    """Read body, produce, await the ack, answer 202."""

    def __init__(self, bootstrap: str, topic: str, linger_ms: int) -> None:
        self.bootstrap, self.topic, self.linger_ms = bootstrap, topic, linger_ms
        self.producer: AIOKafkaProducer | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.producer = AIOKafkaProducer(
                        bootstrap_servers=self.bootstrap,
                        acks="all",
                        enable_idempotence=False,
                        linger_ms=self.linger_ms,
                    )
                    await self.producer.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.producer is not None:
                        await self.producer.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.producer is not None
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if scope["path"] == "/health":
            status = 200
        else:
            await (await self.producer.send(self.topic, b"".join(chunks)))
            status = 202
        await send({"type": "http.response.start", "status": status, "headers": HEADERS})
        await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    """Serve until SIGTERM."""
    port, bootstrap, topic, linger = sys.argv[1:5]
    uvicorn.run(
        BareApp(bootstrap, topic, int(linger)),
        host="127.0.0.1",
        port=int(port),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
        proxy_headers=False,  # as the gateway runs
    )


if __name__ == "__main__":
    main()
