"""What every stage bench needs: the broker, ClickHouse, stage processes, counts and memory.

Everything runs on loopback in temp dirs. Topic sizes come from fetch high watermarks, never
from ListOffsets: the Tansu broker answers ListOffsets(latest) with the last batch's base
offset + 1, so `end_offsets` undercounts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import REPO_ROOT
from bench.events import GEO_NETWORKS
from ingest.records import ENVELOPE_HEADER
from millimetric_app.embedded import free_port, wait_for_port

CLICKHOUSE_SERVER_BIN = Path("/usr/sbin/clickhouse-server")

CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <tcp_port>{tcp}</tcp_port><http_port>{http}</http_port><listen_host>127.0.0.1</listen_host>
  <path>{root}/data/</path><tmp_path>{root}/tmp/</tmp_path>
  <user_files_path>{root}/user_files/</user_files_path>
  <format_schema_path>{root}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config><default_profile>default</default_profile>
  <default_database>default</default_database><timezone>UTC</timezone>
  <mark_cache_size>104857600</mark_cache_size><mlock_executable>false</mlock_executable>
  {extra}
</yandex>
"""
CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
  </interval></default></quotas>
</yandex>
"""


class LocalServer(ABC):
    """A server process run from its own directory (its log there too), up once its port
    accepts connections; subclasses say what to run."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.tcp = root, port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def argv(self) -> list[str]:
        """The command line that runs the server."""

    def start(self) -> Self:
        """Start it and wait for its port."""
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.root,
            stdout=(self.root / "server.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.tcp, 60)
        return self

    def stop(self) -> None:
        """Stop it."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


class ClickHouseServer(LocalServer):
    """Debian's clickhouse-server (18.16) with its own config and data dir; `extra`: more config
    elements (a cluster member's, for one)."""

    def __init__(self, root: Path, tcp: int | None = None, extra: str = "") -> None:
        super().__init__(root, tcp)
        (root / "config.xml").write_text(
            CLICKHOUSE_CONFIG.format(tcp=self.tcp, http=free_port(), root=root, extra=extra)
        )
        (root / "users.xml").write_text(CLICKHOUSE_USERS)

    def argv(self) -> list[str]:
        """clickhouse-server with this server's config."""
        return [str(CLICKHOUSE_SERVER_BIN), f"--config-file={self.root / 'config.xml'}"]

    def url(self, database: str) -> str:
        """A clickhouse:// URL for one database on this server."""
        return f"clickhouse://default:@127.0.0.1:{self.tcp}/{database}"


def write_geo_db(path: Path) -> Path:
    """A small MaxMind-format country database over the bench's IP ranges (needs mmdb-writer,
    from the test extra); without it the bench runs with geo off and says so."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(
        ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"]
    )
    for cidr, iso in GEO_NETWORKS.items():
        country = {"iso_code": iso, "names": {"en": iso}}
        writer.insert_network(IPSet([cidr]), {"country": country, "registered_country": country})
    writer.to_db_file(str(path))
    return path


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    """A child process (a stage, a bare baseline, a load generator) with its log."""

    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        """Start it."""
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    def peak_rss_mb(self) -> float:
        """Its VmHWM so far."""
        return peak_rss_mb(self.pid)

    def stop(self, kill: bool = False, timeout: float = 20) -> None:
        """SIGTERM it (SIGKILL after `timeout`), or SIGKILL it at once with `kill`."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def stage_env(bootstrap: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment tests/services.py's Pipeline gives the stages."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
        "MILLIMETRIC_IP_SALT": "bench-salt",
        "MILLIMETRIC_FORGET_AUDIT_KEY": "bench-audit-key",
        "MILLIMETRIC_DATA_DIR": str(data_dir),
        "MILLIMETRIC_LOG_LEVEL": "WARNING",
        **extra,
    }


def stage(name: str, env: dict[str, str], log_dir: Path) -> Proc:
    """`millimetric <name>` as its own process."""
    return Proc(["-m", "millimetric_app.cli", name], env, log_dir / f"{name}.log")


def wait_http_ok(url: str, timeout: float = 60) -> None:
    """Poll a GET until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start_stages(
    bootstrap: str, data_dir: Path, root: Path, stages: dict[str, Proc]
) -> tuple[str, dict[str, str]]:
    """Start sink, processor and gateway into `stages` (the caller stops what started); return
    the gateway's base URL, once it is ready, and the stages' environment."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = stage_env(bootstrap, data_dir, MILLIMETRIC_GATEWAY_PORT=str(port))
    for name in ("sink", "processor", "gateway"):
        stages[name] = stage(name, env, root).start()
    wait_http_ok(f"{base}/ready")
    return base, env


def sink_sql(data_dir: Path, query: str) -> str:
    """A query through a running chdb sink's SQL endpoint; "" while it is not serving yet."""
    from sinks.sql_endpoint import SqlRefused, query_endpoint

    try:
        return query_endpoint(data_dir, query, timeout=30)
    except (OSError, SqlRefused):
        return ""


class TopicCount:
    """How many records a topic holds, from the high watermarks in fetch responses.

    It reads at most one small fetch per partition per call (it seeks to the last watermark
    seen), so watching a topic costs the bench process almost nothing.
    """

    def __init__(self, bootstrap: str, name: str, partitions: int) -> None:
        self._tps = [TopicPartition(name, p) for p in range(partitions)]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=1024,
        )

    async def __aenter__(self) -> TopicCount:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def count(self) -> int:
        """The sum of the partitions' high watermarks (0 for one not fetched yet)."""
        await self._consumer.getmany(timeout_ms=150, max_records=1)
        total = 0
        for tp in self._tps:
            hw = self._consumer.highwater(tp)
            if hw is not None:
                total += hw
                self._consumer.seek(tp, hw)
        return total


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Publish (key, value) pairs with acks=all, waiting for every ack; return seconds taken."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5
    )
    await producer.start()
    try:
        start = time.perf_counter()
        for i in range(0, len(records), 5000):
            futures = [await producer.send(topic, v, key=k) for k, v in records[i : i + 5000]]
            await asyncio.gather(*futures)
        return time.perf_counter() - start
    finally:
        await producer.stop()


def events_in(value: bytes | None) -> int:
    """Events a raw or enriched record carries: an envelope's count (its header leads), else 1."""
    if value is not None and value.startswith(ENVELOPE_HEADER):
        return int(value[len(ENVELOPE_HEADER) : value.index(b",", len(ENVELOPE_HEADER))])
    return 1


class EventCount:
    """How many events a topic's records carry (an envelope counts its events), by reading
    every record's first bytes: for topics of envelopes, where records are not events."""

    def __init__(self, bootstrap: str, name: str, partitions: int) -> None:
        self._tps = [TopicPartition(name, p) for p in range(partitions)]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 << 20,
        )
        self._total = 0

    async def __aenter__(self) -> EventCount:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def count(self) -> int:
        """The events read so far."""
        fetched = await self._consumer.getmany(timeout_ms=150)
        self._total += sum(events_in(m.value) for ms in fetched.values() for m in ms)
        return self._total


async def steady_rate(
    current: Callable[[], Awaitable[int]],
    target: int,
    timeout: float,
    interval: float = 0.25,
) -> tuple[float, float]:
    """Poll `await current()` until it reaches `target`; return (rate, seconds to finish).

    The rate is taken from the first poll that saw progress to the end, over the rows done
    after it, so process start-up and group joins do not count against the stage.
    """
    start = time.monotonic()
    first: tuple[float, int] | None = None
    while time.monotonic() - start < timeout:
        done = await current()
        now = time.monotonic()
        if first is None and done > 0:
            first = (now, done)
        if done >= target:
            if first is None or now - first[0] < 1e-3 or done == first[1]:
                return float("nan"), now - start
            return (done - first[1]) / (now - first[0]), now - start
        await asyncio.sleep(interval)
    raise TimeoutError(f"did not reach {target} in {timeout}s")


async def create_keys(bootstrap: str, count: int) -> list[str]:
    """`count` sk_ keys, one project each (rate limits are per project), published in one go."""
    from gateway.key_admin import new_raw_key, publish_key_records
    from ingest.records import ApiKeyRecord, hash_api_key

    raws = [new_raw_key("sk", "live") for _ in range(count)]
    records: list[ApiKeyRecord] = [
        {
            "v": 1,
            "key_hash": hash_api_key(raw),
            "prefix": raw[:12],
            "project": f"bench{i}",
            "kind": "sk",
            "env": "live",
            "origins": [],
            "created_at": int(time.time() * 1000),
            "revoked_at": None,
        }
        for i, raw in enumerate(raws)
    ]
    await publish_key_records(bootstrap, records)
    return raws
