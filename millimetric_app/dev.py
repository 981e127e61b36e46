"""`millimetric dev`: the whole pipeline on one machine, all embedded.

It starts the Tansu broker unless a broker is configured, then the gateway, a processor worker
and a sink as child processes, restarting any that dies. The broker keeps its log in a local S3
store (SeaweedFS) in the data directory, so what the gateway accepted survives a stop, a crash or
a restart; `--ephemeral` keeps it in memory instead. The data directory also holds ClickHouse
(the sink's chdb store), the keys journal (replayed into a broker whose keys topic is empty) and
the IP salt.

Every child runs in its own process group, so a terminal's Ctrl-C reaches `dev` alone, which
stops them in order: the gateway (it stops accepting and finishes what it took), then, once the
processor and the sink have drained what was accepted, those two, then the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.drain import wait_drained
from ingest.kafka_connection import client_options, security_options
from ingest.records import decode, encode
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.status import dev_metrics_urls
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import EmbeddedBroker, LocalS3, free_port

log = logging.getLogger(__name__)

STATE_FILE = "dev.json"
KEYS_JOURNAL = "keys.jsonl"
QUEUE_DIR = "queue"
STAGES = ("gateway", "processor", "sink")
STAGE_COMMANDS = {"destinations": ["destinations", "run"]}
PR_SET_PDEATHSIG = 1
STAGE_STOP_S = 30.0  # a stage's SIGTERM flush, before SIGKILL
HURRIED_STOP_S = 2.0  # the same after a second Ctrl-C


def die_with_parent() -> None:
    """In a child before exec: get SIGKILL when `dev` dies, even by `kill -9` (Linux), since the
    child's own process group keeps signals sent to dev's group from reaching it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
    """Re-publish the keys journal into a broker whose keys topic is empty (a fresh ephemeral
    one, or a first durable start on a data dir an ephemeral dev used); return the offset to
    journal from."""
    from gateway.key_admin import publish_key_records

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic("keys").name, 0)
        # Tansu's end offset undercounts by up to a batch: journaling from it may repeat a few
        # records in the journal (replaying them twice is harmless), never skip one.
        end = int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()
    if end or not journal.exists():
        return end
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
    """The stage processes, each in its own process group, restarted when one dies."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, stage: str) -> None:
        """Start (or restart) one stage."""
        self.procs[stage] = subprocess.Popen(
            [sys.executable, "-m", "millimetric_app.cli", *STAGE_COMMANDS.get(stage, [stage])],
            env=self._env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def restart_dead(self) -> None:
        """Restart stages that exited on their own."""
        for stage, proc in list(self.procs.items()):
            if proc.poll() is not None:
                log.warning("%s exited with %s; restarting it", stage, proc.returncode)
                self.start(stage)

    async def stop(self, stage: str, hurry: asyncio.Event) -> None:
        """SIGTERM a stage and wait for it to flush and exit; SIGKILL it after STAGE_STOP_S,
        or HURRIED_STOP_S once `hurry` is set."""
        proc = self.procs.pop(stage)
        proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while proc.poll() is None:
            limit = HURRIED_STOP_S if hurry.is_set() else STAGE_STOP_S
            if loop.time() - started > limit:
                proc.kill()
                proc.wait()
                return
            await asyncio.sleep(0.05)


async def run(settings: Settings) -> None:
    """Run the pipeline until SIGINT/SIGTERM, then stop it front to back, draining it."""
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
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
            print("millimetric dev: stopping now", flush=True)
        else:
            stop.set()
            print("millimetric dev: stopping (Ctrl-C again to stop at once)", flush=True)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    store = broker = None
    bootstrap = settings.kafka_bootstrap_servers
    if bootstrap is None:
        if not settings.dev_ephemeral:
            store = LocalS3(settings.data_dir / QUEUE_DIR).start(die_with_parent)
        broker = EmbeddedBroker(store=store).start(die_with_parent)
        bootstrap = broker.bootstrap
    idempotence = settings.kafka_idempotence and broker is None

    async def create_topics() -> None:
        await ensure_topics(
            bootstrap,
            settings.kafka_replication_factor,
            min_insync_replicas=settings.kafka_min_insync_replicas,
            security=security_options(settings),
        )

    # The broker may listen a moment before it answers (it reads its log from S3 first).
    await retrying("dev: create topics", create_topics, attempts=8, max_delay_s=5.0)
    journal = settings.data_dir / KEYS_JOURNAL
    journal_from = await replay_keys(bootstrap, journal) if broker else 0
    # Each stage's metrics port: the configured one, else a free one `status` finds in dev.json.
    # Destinations run only when one is configured, in a process of their own.
    extra = ("destinations",) if settings.destinations() else ()
    stages = (*STAGES, *extra)
    metrics_ports = {
        stage: getattr(settings, f"{stage}_metrics_port") or free_port() for stage in stages
    }
    env = {
        **os.environ,
        "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MILLIMETRIC_KAFKA_IDEMPOTENCE": str(idempotence).lower(),
        "MILLIMETRIC_IP_SALT": resolve_ip_salt(settings),
        "MILLIMETRIC_DATA_DIR": str(settings.data_dir.resolve()),
        **{f"MILLIMETRIC_{s.upper()}_METRICS_PORT": str(p) for s, p in metrics_ports.items()},
    }
    metrics_urls = dev_metrics_urls(metrics_ports, settings.metrics_host)
    state = settings.data_dir / STATE_FILE
    state.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "kafka_bootstrap_servers": bootstrap,
                "metrics_urls": metrics_urls,
            }
        )
    )
    children = Children(env)
    for stage in ("sink", "processor", "gateway", *extra):
        children.start(stage)
    queue = "in memory" if store is None else f"kept in {store.root}"
    print(
        f"millimetric dev: gateway http://{settings.gateway_host}:{settings.gateway_port}, "
        f"broker {bootstrap} ({queue if broker else 'external'}), data in {settings.data_dir}\n"
        f"  metrics: {', '.join(f'{s} {u}' for s, u in metrics_urls.items())}"
        " (`millimetric status` reads them)",
        flush=True,
    )
    kafka = client_options(settings, bootstrap)
    journal_task = (
        asyncio.create_task(journal_keys(kafka, journal, journal_from, stop)) if broker else None
    )
    try:
        while not stop.is_set():
            children.restart_dead()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        await children.stop("gateway", hurry)
        try:
            left = await asyncio.wait_for(
                wait_drained(bootstrap, settings.dev_drain_timeout_s, hurry),
                settings.dev_drain_timeout_s + 30,
            )
        except Exception as error:  # a broker gone: nothing more can drain
            print(f"millimetric dev: cannot drain ({error!r})", flush=True)
            left = {}
        if any(left.values()):
            fate = (
                "are lost with the in-memory queue"
                if broker and store is None
                else "stay in the queue and are stored at the next start"
            )
            print(
                f"millimetric dev: {left['processor']} accepted events not processed and "
                f"{left['sink']} processed events not yet in ClickHouse {fate}",
                flush=True,
            )
        # Both have drained (or time is up): they stop side by side.
        # Destinations resume from their committed offsets: they do not hold up the stop.
        await asyncio.gather(
            *(children.stop(stage, hurry) for stage in ("processor", "sink", *extra))
        )
        if journal_task is not None:
            await journal_task
        state.unlink(missing_ok=True)
        if broker:
            broker.stop()
        if store:
            store.stop()
