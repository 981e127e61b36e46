"""The result table: one row per measurement, beside its same-run baseline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Row:
    """One measurement. `baseline` is None where the target is absolute (e.g. p99 ≤ 10 ms)."""

    stage: str
    metric: str
    value: float
    baseline: float | None
    target: str
    unit: str

    @property
    def ratio(self) -> float | None:
        """value / baseline, when there is a baseline."""
        if self.baseline is None or not self.baseline or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    def as_dict(self) -> dict[str, Any]:
        """The JSON row: stage, metric, value, baseline, ratio, target, unit."""
        ratio = self.ratio
        return {
            "stage": self.stage,
            "metric": self.metric,
            "value": _round(self.value),
            "baseline": None if self.baseline is None else _round(self.baseline),
            "ratio": None if ratio is None else round(ratio, 3),
            "target": self.target,
            "unit": self.unit,
        }


def _round(x: float) -> float | None:
    if math.isnan(x):
        return None
    return round(x, 1) if abs(x) >= 10 else round(x, 3)


def _cell(x: float | None, suffix: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}{suffix}" if abs(x) >= 10 else f"{x:.3g}{suffix}"


def markdown(rows: list[Row]) -> str:
    """The table as Markdown (what the CLI prints and docs/PERFORMANCE.md shows)."""
    lines = [
        "| stage | metric | value | baseline | ratio | target | unit |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        d = r.as_dict()
        lines.append(
            f"| {r.stage} | {r.metric} | {_cell(d['value'])} | {_cell(d['baseline'])} | "
            f"{_cell(d['ratio'], 'x')} | {r.target} | {r.unit} |"
        )
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    """The rows as a JSON list."""
    path.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
