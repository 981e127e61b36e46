"""`millimetric dev` as a user runs it: what it accepted survives Ctrl-C, `kill -9` and a restart.

Each test runs the real `dev` command in a process group of its own, as a terminal would, and
signals that whole group, as Ctrl-C (or a `kill -9` of the job) does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.services import wait_http_ok
from millimetric_app.embedded import free_port
from sinks.sql_endpoint import SqlRefused, query_endpoint
from tests.services import not_ready, stage_env

BATCHES, BATCH = 20, 1000
ACCEPTED = BATCHES * BATCH


class Dev:
    """`millimetric dev` on one data dir, started (and restarted) as a terminal would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.env = stage_env(
            {
                "MILLIMETRIC_DATA_DIR": str(root / "data"),
                "MILLIMETRIC_GATEWAY_PORT": str(self.port),
                "MILLIMETRIC_LOG_LEVEL": "WARNING",
            }
        )
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """This run's output (stdout and stderr of dev and of every stage)."""
        return self.root / f"dev-{self.runs}.log"

    def start(self) -> Dev:
        """Start dev and wait until its gateway is ready."""
        self.runs += 1
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "millimetric_app.cli", "dev"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_http_ok(f"http://127.0.0.1:{self.port}/ready", 180)
        return self

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal dev's whole process group, as a terminal's Ctrl-C (or `kill -9 -PGID`)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def cli(self, *args: str) -> str:
        """`millimetric ARGS` against this dev; its stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "millimetric_app.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            raise RuntimeError(done.stderr)
        return done.stdout

    def send(self, key: str) -> None:
        """BATCHES /v1/batch calls of BATCH events each, every one answered 202."""
        for _ in range(BATCHES):
            events = [
                {
                    "event": "view",
                    "event_id": uuid.uuid4().hex,
                    "anonymous_id": f"visitor-{i % 97}",
                    "timestamp": "2026-11-29T10:00:00.000Z",
                }
                for i in range(BATCH)
            ]
            # A 503 (the broker slow to ack on a loaded machine) accepted nothing: send the same
            # batch again after its Retry-After, as a client does; anything else must be 202.
            deadline = time.monotonic() + 120
            while True:
                r = httpx.post(
                    f"http://127.0.0.1:{self.port}/v1/batch",
                    json={"events": events},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                )
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(float(r.headers.get("Retry-After", "1")))
            assert r.status_code == 202, r.text

    def sql(self, query: str) -> str:
        """`millimetric sql QUERY` against this dev, in this process through its running sink's
        endpoint (a poll costs a round trip, not a Python start); RuntimeError with the error."""
        try:
            return query_endpoint(self.root / "data", query)
        except SqlRefused as error:
            raise RuntimeError(str(error)) from None
        except OSError:
            return self.cli("sql", query)  # no sink serves: the command opens the store itself

    def counts(self) -> tuple[int, int, int]:
        """Rows in `events`: plain, with FINAL, and distinct event ids."""
        out = self.sql(
            "SELECT (SELECT count() FROM events), (SELECT count() FROM events FINAL), "
            "(SELECT uniqExact(event_id) FROM events)"
        )
        plain, final, distinct = (int(v) for v in out.split())
        return plain, final, distinct

    def wait_for_rows(self, rows: int, timeout: float = 300) -> tuple[int, int, int]:
        """Poll the counts until `events FINAL` holds `rows` (or time runs out); the last ones.
        Only "not there yet" errors are polled through: any other fails at once."""
        deadline = time.monotonic() + timeout
        counts = (0, 0, 0)
        while counts[1] < rows and time.monotonic() < deadline:
            try:
                counts = self.counts()
            except RuntimeError as error:
                if not not_ready(str(error)):
                    raise
            time.sleep(0.5)
        return counts

    def output(self) -> str:
        """Everything this run printed."""
        return self.log.read_text(errors="replace")


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    """A dev to start; whatever is left of it is killed at the end."""
    d = Dev(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.signal_group(signal.SIGKILL)
        d.proc.wait(30)


def create_key(dev: Dev) -> str:
    """An sk_ key, created as the README shows."""
    return dev.cli("keys", "create", "--project", "demo", "--type", "sk").splitlines()[-1]


@pytest.mark.slow
def test_kill_9_of_the_whole_dev_loses_and_doubles_nothing(dev: Dev) -> None:
    dev.start()
    dev.send(create_key(dev))
    assert dev.proc is not None
    dev.signal_group(signal.SIGKILL)  # while the processor and the sink still work through them
    dev.proc.wait(30)
    dev.start()
    _, final, distinct = dev.wait_for_rows(ACCEPTED)
    assert (final, distinct) == (ACCEPTED, ACCEPTED), dev.output()
    # A batch the sink inserted but had not committed when killed is inserted again: the
    # table collapses those repeats when its parts merge (FINAL reads as if they had).
    dev.cli("sql", "--write", "OPTIMIZE TABLE events FINAL")
    assert dev.counts() == (ACCEPTED, ACCEPTED, ACCEPTED)


@pytest.mark.slow
def test_ctrl_c_drains_everything_accepted_into_clickhouse_before_exiting(dev: Dev) -> None:
    dev.start()
    dev.send(create_key(dev))
    assert dev.proc is not None
    dev.signal_group(signal.SIGINT)
    assert dev.proc.wait(300) == 0
    output = dev.output()
    assert "draining" in output
    assert "Traceback" not in output, output
    assert dev.counts() == (ACCEPTED, ACCEPTED, ACCEPTED)  # dev is gone: this opens the store


def test_idle_ctrl_c_exits_within_10s_without_tracebacks(dev: Dev) -> None:
    dev.start()
    key = create_key(dev)
    r = httpx.post(
        f"http://127.0.0.1:{dev.port}/v1/track",
        json={"event": "signup"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    assert dev.wait_for_rows(1) == (1, 1, 1)  # every stage is up once the event is stored
    time.sleep(5)  # idle: nothing in flight, no stage starting
    assert dev.proc is not None
    dev.signal_group(signal.SIGINT)
    assert dev.proc.wait(10) == 0
    assert "Traceback" not in dev.output(), dev.output()
