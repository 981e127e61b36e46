"""Settings: one frozen object per process, read from `MILLIMETRIC_*` env vars (and CLI flags).

This is the only module that reads the environment. The README's settings table is rendered from
`Settings.model_fields` and checked by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of every stage; each stage reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="MILLIMETRIC_", frozen=True, extra="ignore")

    kafka_bootstrap_servers: str | None = Field(
        None,
        description="Kafka bootstrap servers (`host:port,...`). Unset under `dev`: start "
        "the embedded broker. Unset elsewhere: use the running `dev`'s broker.",
    )
    kafka_idempotence: bool = Field(
        True,
        description="Idempotent producers (Apache Kafka, Redpanda). `dev`'s embedded "
        "broker (Tansu) rejects them, so `dev` turns this off for it.",
    )
    kafka_replication_factor: int = Field(
        1, description="Replication factor of the topics a stage creates at boot (3 in production)."
    )
    kafka_linger_ms: int = Field(
        2, description="Producer linger: lets concurrent requests share one broker round trip."
    )
    kafka_compression: str | None = Field(
        None, description="Producer compression (`gzip`, `lz4`, `zstd`, `snappy`); unset: none."
    )
    clickhouse_url: str | None = Field(
        None,
        description="`clickhouse://user:pass@host:9000/db` for a server (clickhouse-driver). "
        "Unset: the embedded chdb store in `<data_dir>/clickhouse`.",
    )
    data_dir: Path = Field(
        Path(".millimetric"),
        description="Where `dev` keeps its queue (the embedded broker's log), the embedded "
        "ClickHouse, the keys journal and its generated IP salt.",
    )
    dev_ephemeral: bool = Field(
        False,
        description="`dev`'s embedded broker keeps its queue in memory (`dev --ephemeral`): "
        "faster, for tests and benchmarks, but accepted events not yet in ClickHouse are lost "
        "when `dev` stops without draining, crashes or is killed.",
    )
    dev_drain_timeout_s: float = Field(
        60.0,
        description="How long `dev` waits, when asked to stop, for the processor and the sink "
        "to store what the gateway accepted (a second Ctrl-C stops at once).",
    )
    gateway_host: str = Field("127.0.0.1", description="Gateway bind address.")
    gateway_port: int = Field(8787, description="Gateway port.")
    ip_salt: SecretStr | None = Field(
        None,
        description="Secret for ip_hash = HMAC(ip, salt ‖ UTC date). Required by "
        "`processor`; `dev` generates one into `<data_dir>/ip_salt` when unset.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs of proxies whose X-Forwarded-For is believed "
        '(JSON list, e.g. `["10.0.0.0/8"]`); otherwise the client IP is the peer address.',
    )
    edge_country_header: str | None = Field(
        None,
        description="A trusted edge header carrying the visitor's country (e.g. "
        "`CF-IPCountry`); used before the geo database.",
    )
    geoip_path: Path | None = Field(
        None,
        description="A MaxMind-format country database (GeoLite2-Country, DB-IP Lite); "
        "unset: country is empty unless an edge header gives it.",
    )
    project_rules_path: Path | None = Field(
        None,
        description="A TOML file of per-project attribution rules, run before the "
        "built-ins: `[[demo]]` tables shaped like `processors/attribution.toml`'s rules.",
    )
    drop_bots: bool = Field(
        False,
        description="Drop events whose User-Agent is a crawler or monitor (otherwise "
        "they are kept with `is_bot = 1`).",
    )
    redis_url: str | None = Field(
        None,
        description="Redis for rate limits shared by several gateways; unset: in-memory "
        "buckets (one gateway).",
    )
    rate_limit_fail_open: bool = Field(
        True, description="When Redis is unreachable, accept (true) or refuse with 429 (false)."
    )
    publish_timeout_s: float = Field(
        5.0, description="How long the gateway waits for the broker's ack before answering 503."
    )
    track_max_bytes: int = Field(32_768, description="Body limit of /v1/track and /v1/identify.")
    batch_max_bytes: int = Field(1_048_576, description="Body limit of /v1/batch.")
    batch_max_events: int = Field(1000, description="Events per /v1/batch call.")
    properties_max_bytes: int = Field(
        8192, description="Limit of `properties` (and `traits`), as compact UTF-8 JSON."
    )
    session_timeout_min: int = Field(
        30, description="Bucket width of the derived session_id (`${anonymous_id}-${bucket}`)."
    )
    processor_batch_size: int = Field(1000, description="Events the processor handles per step.")
    processor_batch_seconds: float = Field(
        0.05, description="Longest the processor waits to fill a step."
    )
    processor_port: int | None = Field(
        None,
        description="Serve the processor's `GET /ready` (geo database loaded or not) on "
        "127.0.0.1:PORT; unset: no HTTP server in the processor.",
    )
    processor_producer_max_batch_size: int | None = Field(
        None,
        description="Processor producer batch size in bytes (unset: Faust's 16 KiB for "
        "changelogs, 512 KiB for enriched records); 1 makes every changelog batch one record, "
        "which table recovery needs on brokers with inexact end offsets (Tansu). Costs "
        "throughput: for tests.",
    )
    sink_batch_rows: int = Field(20_000, description="Rows per ClickHouse insert, at most.")
    sink_batch_seconds: float = Field(1.0, description="Longest a row waits in the sink's batch.")
    sink_retry_max_s: float = Field(
        30.0, description="Cap of the sink's exponential backoff while ClickHouse refuses."
    )
    forget_grace_s: float = Field(
        5.0,
        description="How long a forget waits for every sink to filter the person before "
        "deleting, and again before checking nothing landed after the delete.",
    )
    retention_days: int | None = Field(
        None,
        description="Days `events` keeps rows (a TTL, on servers that have TTL); unset: "
        "forever. Aggregates are kept.",
    )
    log_level: str = Field("INFO", description="Python log level of every stage.")

    def ip_salt_value(self) -> bytes:
        """The IP salt as bytes; stages that hash IPs call this at start-up."""
        if self.ip_salt is None:
            raise ValueError("MILLIMETRIC_IP_SALT is required to hash IPs")
        return self.ip_salt.get_secret_value().encode()


def markdown_table() -> str:
    """Render the settings as the README shows them."""
    lines = ["| env var | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        value = field.get_default(call_default_factory=True)
        default = (
            "" if value is None else f"`{json.dumps(value) if isinstance(value, list) else value}`"
        )
        lines.append(f"| `MILLIMETRIC_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(lines)
