"""Client bench: one process using millimetric.Client against the whole pipeline (chdb sink).

1. Throughput: the process tracks `events` as fast as one thread can (they fit the queue) and
   closes the client; the rate is the events over the time until close() returned with all of
   them accepted, and again until the last is counted in ClickHouse.
2. The caller's cost: track() timed one call at a time at a paced 2,000 events/s, first with the
   gateway up, then with it stopped (the sender retrying behind the queue); the gateway is
   restarted after the down phase and the bench checks every event was accepted.
The load runs in a process of its own (`python -m bench.client LOAD_JSON`), so what is measured is
one client process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import REPO_ROOT
from bench.loadgen import percentile
from bench.services import Proc, create_keys, sink_sql, start_stages
from bench.table import Row
from ingest.topics import ensure_topics
from millimetric_app.embedded import EmbeddedBroker

PACED_EPS = 2_000


def load(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the load process: track `events` at `rate` (0: flat out), then close."""
    from millimetric import Client

    client = Client(spec["base"], spec["key"], shutdown_timeout_s=spec["close_timeout_s"])
    timings: list[int] = []
    started = time.perf_counter()
    gap = 1 / spec["rate"] if spec["rate"] else 0.0
    for i in range(spec["events"]):
        if gap:
            pause = started + i * gap - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        t0 = time.perf_counter_ns()
        client.track("bench_client", {"i": i, "plan": "pro"}, anonymous_id=f"a{i % 1000}")
        timings.append(time.perf_counter_ns() - t0)
    tracked = time.perf_counter()
    Path(spec["tracked_marker"]).touch()
    result = client.close()
    done = time.perf_counter()
    micros = [t / 1000 for t in timings]
    return {
        "accepted": result.accepted,
        "failed": result.failed,
        "pending": result.pending,
        "track_s": tracked - started,
        "seconds": done - started,
        "p50_us": percentile(micros, 0.5),
        "p99_us": percentile(micros, 0.99),
        "max_us": max(micros),
        "retries": dict(client.retries),
    }


def _start_load(root: Path, name: str, spec: dict[str, Any]) -> tuple[subprocess.Popen[str], Path]:
    out = root / f"{name}.json"
    marker = root / f"{name}.tracked"
    marker.unlink(missing_ok=True)
    spec = {**spec, "tracked_marker": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.client", json.dumps(spec), str(out)], cwd=REPO_ROOT, text=True
    )
    return proc, out


def _finish(proc: subprocess.Popen[str], out: Path, timeout: float) -> dict[str, Any]:
    if proc.wait(timeout):
        raise RuntimeError(f"the client load failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def count_events(data_dir: Path) -> int:
    """Distinct events in the bench's embedded store (0 before the sink serves queries)."""
    got = sink_sql(data_dir, "SELECT count() FROM events FINAL")
    return int(got) if got else 0


def wait_count(data_dir: Path, expected: int, timeout: float) -> float:
    """Wait until `events` holds `expected` rows; return the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_events(data_dir) >= expected:
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"ClickHouse did not reach {expected} rows in {timeout}s")


def run(root: Path, events: int, seconds: float, gateway_eps: float | None = None) -> list[Row]:
    """The client rows; `gateway_eps` (the gateway's /v1/batch rate under wrk) is the baseline."""
    from gateway.key_admin import set_project_limit
    from gateway.rate_limit import Limit

    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    broker = EmbeddedBroker().start()
    stages: dict[str, Proc] = {}
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        (key,) = asyncio.run(create_keys(broker.bootstrap, 1))
        asyncio.run(set_project_limit(broker.bootstrap, "bench0", "batch", Limit(1e6, 1_000_000)))
        base, _ = start_stages(broker.bootstrap, data_dir, root, stages)
        time.sleep(2)  # the limit override reaches the gateway through the keys topic
        spec = {"base": base, "key": key, "close_timeout_s": 300.0}

        start = time.monotonic()
        proc, out = _start_load(root, "throughput", spec | {"events": events, "rate": 0})
        flat = _finish(proc, out, 600)
        visible = wait_count(data_dir, events, 300) - start
        paced_n = int(PACED_EPS * seconds)
        proc, out = _start_load(root, "paced_up", spec | {"events": paced_n, "rate": PACED_EPS})
        up = _finish(proc, out, 600)

        stages["gateway"].stop()
        proc, out = _start_load(root, "paced_down", spec | {"events": paced_n, "rate": PACED_EPS})
        while proc.poll() is None and not (root / "paced_down.tracked").exists():
            time.sleep(0.1)
        stages["gateway"].start()
        down = _finish(proc, out, 600)
        wait_count(data_dir, events + 2 * paced_n, 300)
    finally:
        for name in ("gateway", "processor", "sink"):
            if name in stages:
                stages[name].stop()
        broker.stop()
    for name, got in (("throughput", flat), ("paced up", up), ("paced down", down)):
        print(f"client {name}: {json.dumps(got)}")
        if got["failed"] or got["pending"]:
            raise RuntimeError(f"client {name}: not every event was accepted: {got}")
    at = f"{PACED_EPS:,} events/s"
    return [
        Row("client", f"events/s accepted, one process, {events:,} events", events /
            flat["seconds"], gateway_eps, "-", "events/s"),
        Row("client", "events/s visible in ClickHouse (pipeline-bound)", events / visible, None,
            "-", "events/s"),
        Row("client", "track() p99, flat out", flat["p99_us"], None, "µs", "µs"),
        Row("client", f"track() p99 at {at}, gateway up", up["p99_us"], None, "µs", "µs"),
        Row("client", f"track() p99 at {at}, gateway down", down["p99_us"], None, "µs", "µs"),
        Row("client", "track() max, gateway down", down["max_us"], None, "-", "µs"),
    ]  # fmt: skip


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(load(json.loads(sys.argv[1]))))
