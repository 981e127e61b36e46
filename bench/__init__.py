"""`millimetric bench`: throughput, latency and memory of every stage, each beside a baseline
measured in the same run on the same machine (see docs/PERFORMANCE.md for the method).

Modules: `events` (the synthetic traffic), `services` (broker, ClickHouse, stage processes,
watermarks, RSS), one module per stage (`gateway`, `processor`, `sink`, `end_to_end`), the
external load generator (`loadgen`), the bare baselines run as their own processes
(`bare_gateway`, `bare_processor`, `bare_insert`), and `run`, which composes them.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
