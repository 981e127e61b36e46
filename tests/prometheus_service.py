"""A real Prometheus (Debian's `prometheus` package) scraping test services on loopback."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.services import wait_http_ok
from millimetric_app.embedded import free_port

PROMETHEUS_BIN = Path("/usr/bin/prometheus")

CONFIG = """global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: {rules}
scrape_configs:
{jobs}
"""
JOB = """  - job_name: {name}
    static_configs:
      - targets: ["{target}"]
"""


class Prometheus:
    """One Prometheus server with its own config and data dir; `targets`: job -> host:port."""

    def __init__(self, root: Path, targets: dict[str, str], rules: list[Path] | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = "".join(JOB.format(name=n, target=t) for n, t in targets.items())
        (root / "prometheus.yml").write_text(
            CONFIG.format(rules=json.dumps([str(r) for r in rules or []]), jobs=jobs)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        """Start it and wait until it is ready."""
        self.proc = subprocess.Popen(
            [
                str(PROMETHEUS_BIN),
                f"--config.file={self.root / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=(self.root / "prometheus.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_http_ok(f"{self.url}/-/ready", 60)
        return self

    def api(self, path: str, **params: str) -> object:
        """GET /api/v1/<path> and return its `data`."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one series (None: no series)."""
        data = self.api("query", query=promql)
        assert isinstance(data, dict)
        result = data["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float, timeout: float = 90) -> None:
        """Poll a query until it yields `expected`."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while time.monotonic() < deadline:
            last = self.value(promql)
            if last == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{promql} gave {last}, expected {expected}")

    def stop(self) -> None:
        """Stop it."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
