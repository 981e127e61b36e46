"""Gateway bench: /v1/track and /v1/batch of 500, against a bare ASGI app and raw aiokafka.

- saturation: wrk (closed loop, 1 thread, 32 connections) with a Lua script that varies the
  anonymous_id and rotates 200 sk_ keys (one project each: limits are per project, and the bench
  measures the gateway, not the limiter's refusals);
- latency at a fixed 1000 req/s: bench.loadgen, open loop, latency from the scheduled send time;
- /v1/batch of 500: wrk with 4 connections, events/s = accepted requests/s x 500; the baseline
  publishes the same 500 raw events per round trip from one process, 4 rounds in flight, as the
  gateway's design has them: one envelope per partition per round (the default), or one record
  per event (a second gateway with MILLIMETRIC_ENVELOPES=false, measured on /v1/batch only).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.events import DESIGNS, batch_body, grouped, raw_events, track_body
from bench.services import Proc, create_keys, stage, stage_env, wait_http_ok
from bench.table import Row
from ingest.records import encode, record_key
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import EmbeddedBroker, free_port

KEYS = 200
BATCH = 500
TRACK_CONNECTIONS = 32
BATCH_CONNECTIONS = 4
FIXED_RATE = 1000


@dataclass
class Load:
    """What one server did under the track and batch loads."""

    track_rps: float = float("nan")
    track_refused: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    batch_eps: float = float("nan")
    peak_rss_mb: float = float("nan")


def wrk_script(path: Path, keys: list[str], body: str) -> Path:
    """A wrk Lua script: POST `body` ("%N%" -> a counter), rotating Bearer keys."""
    pre, mark, post = body.partition("%N%")
    quoted = ", ".join(json.dumps(k) for k in keys)
    payload = "pre .. n .. post" if mark else "pre"
    path.write_text(
        f"local keys = {{{quoted}}}\n"
        f"local pre, post = [==[{pre}]==], [==[{post}]==]\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        '  local headers = {["Content-Type"] = "application/json",\n'
        '    ["Authorization"] = "Bearer " .. keys[n % #keys + 1]}\n'
        f'  return wrk.format("POST", nil, headers, {payload})\n'
        "end\n"
    )
    return path


def wrk(url: str, script: Path, seconds: float, connections: int) -> tuple[float, int, int]:
    """Run wrk; return (2xx responses per second, 2xx responses, other responses)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)[1])  # type: ignore[index]
    took = re.search(r"requests in ([\d.]+)(m?s)", out)
    elapsed = float(took[1]) / (1000 if took[2] == "ms" else 1)  # type: ignore[index]
    refused = int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return (total - refused) / elapsed, total - refused, refused


def open_loop(url: str, keys: list[str], body: str, rate: float, seconds: float) -> dict:
    """bench.loadgen at a fixed rate, as its own process."""
    spec = {
        "url": url,
        "rate": rate,
        "seconds": seconds,
        "body": body,
        "keys": keys,
        "headers": {"Content-Type": "application/json"},
    }
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(out.stdout)


def track_template() -> str:
    """A /v1/track body whose anonymous_id varies per request."""
    body = track_body(random.Random(3), 0)
    body["anonymous_id"] = "anon-%N%"
    return json.dumps(body)


def drive(base: str, keys: list[str], root: Path, seconds: float, batch: bool) -> Load:
    """Warm up, then saturation, fixed-rate latency and (for the gateway) batch throughput."""
    load = Load()
    track = wrk_script(root / "track.lua", keys, track_template())
    wrk(f"{base}/v1/track", track, 2, TRACK_CONNECTIONS)  # warm-up
    load.track_rps, _, load.track_refused = wrk(
        f"{base}/v1/track", track, seconds, TRACK_CONNECTIONS
    )
    fixed = open_loop(f"{base}/v1/track", keys, track_template(), FIXED_RATE, seconds)
    load.p50_ms, load.p99_ms = fixed["p50_ms"], fixed["p99_ms"]
    if batch:
        script = wrk_script(root / "batch.lua", keys, json.dumps(batch_body(BATCH)))
        rps, _, _ = wrk(f"{base}/v1/batch", script, seconds, BATCH_CONNECTIONS)
        load.batch_eps = rps * BATCH
    return load


async def raw_batches(bootstrap: str, seconds: float, envelopes: bool) -> float:
    """Events/s of raw aiokafka publishing 500-event rounds (each acked), 4 in flight: 500
    records, or (`envelopes`) one envelope per partition."""
    records = [
        (record_key(r["project"], r["anonymous_id"], r["event_id"]), encode(r))
        for r in raw_events(BATCH, int(time.time() * 1000))
    ]
    values = grouped(records, BATCH) if envelopes else records
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=2
    )
    await producer.start()
    sent = 0
    deadline = time.perf_counter() + seconds

    async def rounds() -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            futures = [await producer.send(topic("raw").name, v, key=k) for k, v in values]
            await asyncio.gather(*futures)
            sent += len(records)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(rounds() for _ in range(BATCH_CONNECTIONS)))
        return sent / (time.perf_counter() - start)
    finally:
        await producer.stop()


def single_batches(bootstrap: str, keys: list[str], root: Path, seconds: float) -> float:
    """/v1/batch events/s of a gateway publishing one record per event (the previous design)."""
    port = free_port()
    env = stage_env(bootstrap, root / "data-single", MILLIMETRIC_GATEWAY_PORT=str(port),
                    MILLIMETRIC_ENVELOPES=DESIGNS["single records"])  # fmt: skip
    gw = Proc(["-m", "millimetric_app.cli", "gateway"], env, root / "gateway-single.log").start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/ready")
        script = wrk_script(root / "batch.lua", keys, json.dumps(batch_body(BATCH)))
        wrk(f"http://127.0.0.1:{port}/v1/batch", script, 2, BATCH_CONNECTIONS)  # warm-up
        rps, _, _ = wrk(f"http://127.0.0.1:{port}/v1/batch", script, seconds, BATCH_CONNECTIONS)
        return rps * BATCH
    finally:
        gw.stop()


def run(root: Path, seconds: float) -> tuple[list[Row], Load]:
    """The gateway's rows (and its loads, for the report)."""
    root.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker().start()
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        keys = asyncio.run(create_keys(broker.bootstrap, KEYS))
        port = free_port()
        env = stage_env(broker.bootstrap, root / "data", MILLIMETRIC_GATEWAY_PORT=str(port))
        gw = stage("gateway", env, root).start()
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/ready")
            real = drive(f"http://127.0.0.1:{port}", keys, root, seconds, batch=True)
            real.peak_rss_mb = gw.peak_rss_mb()
        finally:
            gw.stop()
        single_eps = single_batches(broker.bootstrap, keys, root, seconds)
        port = free_port()
        args = ["-m", "bench.bare_gateway", str(port), broker.bootstrap, topic("raw").name, "2"]
        bare = Proc(args, env, root / "bare_gateway.log").start()
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/health")
            base = drive(f"http://127.0.0.1:{port}", keys, root, seconds, batch=False)
            base.peak_rss_mb = bare.peak_rss_mb()
        finally:
            bare.stop()
        base.batch_eps = asyncio.run(raw_batches(broker.bootstrap, seconds, True))
        single_base = asyncio.run(raw_batches(broker.bootstrap, seconds, False))
    finally:
        broker.stop()
    refused = f" ({real.track_refused} refused)" if real.track_refused else ""
    rows = [
        Row("gateway", f"/v1/track req/s at saturation{refused}", real.track_rps,
            base.track_rps, "≥ 0.7x", "req/s"),
        Row("gateway", f"/v1/track p50 at {FIXED_RATE} req/s", real.p50_ms, base.p50_ms,
            "-", "ms"),
        Row("gateway", f"/v1/track p99 at {FIXED_RATE} req/s", real.p99_ms, base.p99_ms,
            "≤ 10 ms", "ms"),
        Row("gateway", f"/v1/batch of {BATCH} events/s, envelopes", real.batch_eps,
            base.batch_eps, "≥ 0.9x", "events/s"),
        Row("gateway", f"/v1/batch of {BATCH} events/s, single records", single_eps,
            single_base, "≥ 0.5x", "events/s"),
        Row("gateway", f"/v1/batch of {BATCH} events/s: envelopes vs single records",
            real.batch_eps, single_eps, "-", "events/s"),
        Row("gateway", "peak RSS (VmHWM)", real.peak_rss_mb, base.peak_rss_mb, "≤ 150 MB", "MB"),
    ]  # fmt: skip
    return rows, real
