"""Metric names: the one table of every Prometheus metric the stages record.

Code records through the objects below; the README's metrics table is rendered from `METRICS`.
Labels are bounded (operation, stage, reason, route, code): never a key or a project id.
"""

from __future__ import annotations

from prometheus_client import Counter

RETRIES = Counter(
    "millimetric_retries",
    "Attempts of a failing operation that were retried after a backoff, by operation.",
    ["operation"],
)
GAVE_UP = Counter(
    "millimetric_retries_exhausted",
    "Operations that failed every allowed attempt with an error that cannot heal, by operation.",
    ["operation"],
)
DEAD_LETTERS = Counter(
    "millimetric_dead_letters",
    "Records sent to the dead-letter topic, by stage and reason.",
    ["stage", "reason"],
)

DEVICES_OVER_CAP = Counter(
    "millimetric_processor_devices_over_cap",
    "Identifies past MILLIMETRIC_PROCESSOR_MAX_DEVICES_PER_USER: the device was unlinked.",
)
WEBHOOK_DELIVERIES = Counter(
    "millimetric_webhook_deliveries",
    "Webhook deliveries by provider and outcome (`accepted` or the error code).",
    ["provider", "outcome"],
)

METRICS: tuple[Counter, ...] = (
    RETRIES,
    GAVE_UP,
    DEAD_LETTERS,
    DEVICES_OVER_CAP,
    WEBHOOK_DELIVERIES,
)


def markdown_table() -> str:
    """Render the metrics as the README shows them."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric in METRICS:
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)
        lines.append(f"| `{metric._name}_total` | counter | {labels} | {metric._documentation} |")
    return "\n".join(lines)
