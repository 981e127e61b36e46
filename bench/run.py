"""`millimetric bench [--quick] [--read-events N] [--json FILE]`: every stage beside its
baseline, one table.

Each stage bench starts its own broker (and stores), so one stage's topics never feed the next;
the end-to-end bench runs last and uses the slowest stage's throughput as its baseline.
"""

from __future__ import annotations

import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench import (
    backfill,
    classify,
    client,
    end_to_end,
    forget,
    gateway,
    processor,
    read_api,
    sink,
)
from bench.table import Row, markdown, write_json


@dataclass(frozen=True, slots=True)
class Sizes:
    """How long and how much each bench runs."""

    seconds: float  # each load of the gateway and end-to-end benches
    processor_events: int
    sink_rows: int
    classify_events: int
    client_events: int  # tracked by one millimetric.Client process
    forgets: int
    backfill_events: int  # lines of the file `millimetric backfill` imports
    read_events: int  # synthetic events the read API bench loads (10 M is the size)


QUICK = Sizes(
    seconds=6,
    processor_events=20_000,
    sink_rows=60_000,
    classify_events=20_000,
    client_events=30_000,
    forgets=200,
    backfill_events=20_000,
    read_events=100_000,
)
FULL = Sizes(
    seconds=20,
    processor_events=100_000,
    sink_rows=300_000,
    classify_events=100_000,
    client_events=100_000,
    forgets=1_000,
    backfill_events=100_000,
    read_events=1_000_000,
)


def machine() -> str:
    """CPU model and count, for the report."""
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor()
    import os

    return f"{os.cpu_count()} CPUs, {model}, Python {platform.python_version()}"


def main(quick: bool, json_path: Path | None, read_events: int | None = None) -> int:
    """Run every bench, print the table, write the JSON rows; `read_events` overrides the
    read API bench's size (0 leaves it out)."""
    sizes = QUICK if quick else FULL
    if read_events is not None:
        sizes = replace(sizes, read_events=read_events)
    root = Path(tempfile.mkdtemp(prefix="millimetric-bench-"))
    started = time.monotonic()
    print(f"millimetric bench ({'quick' if quick else 'full'}) on {machine()}; logs in {root}")
    rows: list[Row] = classify.run(sizes.classify_events)
    gw_rows, gw = gateway.run(root / "gateway", sizes.seconds)
    rows += gw_rows
    proc_rows, proc_eps = processor.run(root / "processor", sizes.processor_events)
    rows += proc_rows
    sink_rows, sink_rps = sink.run(root / "sink", sizes.sink_rows)
    rows += sink_rows
    rows += forget.run(root / "forget", sizes.forgets)
    slowest = min(gw.batch_eps, proc_eps, sink_rps)
    rows += end_to_end.run(root / "end_to_end", sizes.seconds, slowest)
    rows += client.run(root / "client", sizes.client_events, sizes.seconds, gw.batch_eps)
    rows += backfill.run(root / "backfill", sizes.backfill_events, gw.batch_eps)
    if sizes.read_events:
        rows += read_api.run(sizes.read_events)
    print(markdown(rows))
    print(f"took {time.monotonic() - started:.0f}s")
    if json_path is not None:
        write_json(rows, json_path)
        print(f"wrote {json_path}")
    return 0
