"""Kafka and ClickHouse connections: TLS and SASL settings reach every client the stages make,
secrets stay out of reprs and logs, and topics are created with their durability settings.

TLS is tested for real: haproxy terminates TLS in front of the Tansu broker (which speaks
plaintext), with a certificate made here by `openssl`, and the gateway, key admin and topic
creation talk to it only through TLS. SASL needs a broker that has it, so for SASL the test
checks the options every client is built with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from gateway.app import build_app
from gateway.key_admin import create_key
from ingest.kafka_connection import client_options, faust_credentials, security_options
from ingest.settings import Settings
from ingest.topics import ensure_topics
from millimetric_app.embedded import EmbeddedBroker, free_port, wait_for_port
from tests.test_gateway import JSON, gateway_settings

KAFKA_SECRET = "kafka-hunter2-secret"
CH_SECRET = "ch-hunter2-secret"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate = CA file, cert+key PEM)."""
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle = root / "bundle.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, bundle


def sasl_settings(cafile: Path | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="ingest",
        kafka_sasl_password=KAFKA_SECRET,
        kafka_ssl_cafile=cafile,
        clickhouse_url=f"clickhouse://ingest:{CH_SECRET}@127.0.0.1:1/analytics",
    )
    return Settings(**(values | overrides))


def test_secrets_stay_out_of_settings_reprs_and_the_clickhouse_url() -> None:
    settings = sasl_settings()
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert KAFKA_SECRET not in shown and CH_SECRET not in shown
    assert settings.clickhouse_url == "clickhouse://ingest@127.0.0.1:1/analytics"
    assert settings.clickhouse_password is not None
    assert settings.clickhouse_password.get_secret_value() == CH_SECRET


def test_secrets_stay_out_of_logs_when_connections_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sinks.clickhouse import open_configured

    settings = sasl_settings(kafka_security_protocol="SASL_PLAINTEXT")
    caplog.set_level(logging.DEBUG)

    async def kafka_fails() -> None:
        admin = AIOKafkaAdminClient(**client_options(settings, f"127.0.0.1:{free_port()}"))
        with pytest.raises(KafkaConnectionError):
            await admin.start()
        await admin.close()

    asyncio.run(kafka_fails())
    with pytest.raises(Exception) as refused:
        open_configured(settings)  # nothing listens on port 1
    logged = caplog.text + str(refused.value)
    assert logged  # the failures were reported...
    assert KAFKA_SECRET not in logged and CH_SECRET not in logged  # ...without the secrets


def _auth(client: Any) -> dict[str, Any]:
    """What an aiokafka client will authenticate with."""
    c = getattr(client, "_client", None) or client.client  # consumers / producers
    return {
        "security_protocol": c._security_protocol,
        "sasl_mechanism": c._sasl_mechanism,
        "sasl_plain_username": c._sasl_plain_username,
        "sasl_plain_password": c._sasl_plain_password,
        "tls": c._ssl_context is not None,
    }


EXPECTED = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "ingest",
    "sasl_plain_password": KAFKA_SECRET,
    "tls": True,
}


def test_sasl_and_tls_reach_every_kafka_client(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from gateway.state import Gateway
    from processors.app import build_app as build_processor
    from sinks.app import Sink
    from sinks.clickhouse import EmbeddedClickHouse
    from sinks.erasure_filter import ErasureFilter

    settings = sasl_settings(certificate[0])
    bootstrap = "127.0.0.1:9093"

    async def clients() -> None:
        gateway = Gateway(settings, bootstrap)
        producer = AIOKafkaProducer(**gateway.publisher._config)
        assert _auth(producer) == EXPECTED
        keys_consumer = AIOKafkaConsumer(**gateway.keys._kafka)
        assert _auth(keys_consumer) == EXPECTED
        ch = EmbeddedClickHouse(tmp_path / "clickhouse")
        sink = Sink(settings, bootstrap, ch, ErasureFilter())
        ch.close()
        assert _auth(sink.consumer) == EXPECTED and _auth(sink.producer) == EXPECTED
        for client in (producer, keys_consumer, sink.consumer, sink.producer):
            await client.stop()

    asyncio.run(clients())
    processor = build_processor(sasl_settings(certificate[0], ip_salt="salt"), bootstrap)
    faust_auth = credentials_to_aiokafka_auth(processor.conf.broker_credentials)
    assert faust_auth["security_protocol"] == "SASL_SSL"
    assert faust_auth["sasl_plain_password"] == KAFKA_SECRET
    assert faust_auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert faust_credentials(Settings()) is None  # plaintext: Faust's default


@contextmanager
def tls_in_front(port: int, bundle: Path, root: Path, tls_port: int = 0) -> Iterator[int]:
    """haproxy terminating TLS (certificate and key in `bundle`) in front of 127.0.0.1:`port`,
    on `tls_port` (0: a free one), which it yields."""
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (tests/run.sh installs it)")
    tls_port = tls_port or free_port()
    config = root / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        f"frontend tls\n  bind 127.0.0.1:{tls_port} ssl crt {bundle}\n  default_backend plain\n"
        f"backend plain\n  server plain 127.0.0.1:{port}\n"
    )
    proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(tls_port)
        yield tls_port
    finally:
        proxy.terminate()
        proxy.wait(30)


@pytest.fixture
def tls_broker(certificate: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    """Tansu behind haproxy terminating TLS: the bootstrap address speaks TLS only."""
    if os.environ.get("MILLIMETRIC_TEST_KAFKA"):
        pytest.skip("runs its own broker behind haproxy")
    broker_port, tls_port = free_port(), free_port()
    broker = EmbeddedBroker(broker_port, advertised_port=tls_port).start()
    try:
        with tls_in_front(broker_port, certificate[1], tmp_path, tls_port) as port:
            yield f"127.0.0.1:{port}"
    finally:
        broker.stop()


def test_the_sink_reaches_clickhouse_over_tls(
    ch_url: str, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from sinks.clickhouse import open_configured

    server = urlsplit(ch_url)
    with tls_in_front(server.port or 9000, certificate[1], tmp_path) as tls_port:
        url = urlunsplit(
            server._replace(
                netloc=f"{server.netloc.rpartition('@')[0] or 'default'}@127.0.0.1:{tls_port}"
            )
        )
        plain = Settings(clickhouse_url=url)
        with pytest.raises(Exception):  # noqa: B017 - the driver's error for a TLS port
            open_configured(plain)
        secure = Settings(
            clickhouse_url=url, clickhouse_secure=True, clickhouse_ca_certs=certificate[0]
        )
        ch = open_configured(secure)
        try:
            assert ch.query_tsv("SELECT 1") == "1\n"
            assert ch.description.endswith("(TLS)")
        finally:
            ch.close()


def test_the_gateway_talks_to_kafka_over_tls(
    tls_broker: str, certificate: tuple[Path, Path]
) -> None:
    settings = gateway_settings(
        tls_broker, kafka_security_protocol="SSL", kafka_ssl_cafile=certificate[0]
    )
    security = security_options(settings)

    async def run() -> None:
        with pytest.raises(KafkaConnectionError):  # plaintext cannot talk to it
            await ensure_topics(tls_broker, roles=["keys"])
        await ensure_topics(tls_broker, security=security)
        key = await create_key(tls_broker, f"tls-{uuid.uuid4().hex[:8]}", "sk", "live", [],
                               security=security)  # fmt: skip
        app = build_app(settings, tls_broker)
        async with app.starlette.router.lifespan_context(app.starlette):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                headers = {**JSON, "authorization": f"Bearer {key}"}
                async with asyncio.timeout(60):  # the key follower reads over TLS too
                    while (
                        r := await client.post("/v1/track", json={"event": "e"}, headers=headers)
                    ).status_code == 503:
                        await asyncio.sleep(0.2)
                assert r.status_code == 202, r.text  # acknowledged through TLS

    asyncio.run(run())


def test_topics_are_created_with_min_insync_replicas(fresh_broker: str) -> None:
    async def run() -> dict[str, str]:
        await ensure_topics(fresh_broker, roles=["raw"], min_insync_replicas=2)
        admin = AIOKafkaAdminClient(bootstrap_servers=fresh_broker)
        await admin.start()
        try:
            from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, "millimetric.raw")]
            )
            [(_, _, _, _, entries)] = response.resources
            return {entry[0]: entry[1] for entry in entries}
        finally:
            await admin.close()

    configs = asyncio.run(run())
    assert configs.get("min.insync.replicas") == "2", configs
