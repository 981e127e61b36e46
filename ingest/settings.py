"""Settings: one frozen object per process, read from `MILLIMETRIC_*` env vars (and CLI flags).

This is the only module that reads the environment. The README's settings table is rendered from
`Settings.model_fields` and checked by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

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
    clickhouse_cluster: str | None = Field(
        None,
        description="A cluster of `remote_servers` in the server's config: the schema becomes "
        "Replicated tables on every replica (`<table>_local`) under Distributed tables, DDL "
        "and deletes run `ON CLUSTER`. Needs ZooKeeper/Keeper and the `shard` and `replica` "
        "macros. Unset: one server.",
    )
    data_dir: Path = Field(
        Path(".millimetric"),
        description="Where `dev` keeps the embedded "
        "ClickHouse, the keys journal and its generated IP salt.",
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
    timestamp_max_age_days: int = Field(
        3650,
        description="How far in the past an event's `timestamp` may be (days before the "
        "gateway's clock); older is refused with 400. Ten years: backfills pass.",
    )
    timestamp_max_future_s: int = Field(
        86_400,
        description="How far ahead of the gateway's clock an event's `timestamp` may be "
        "(seconds); further is refused with 400. A day: device clocks and time-zone slips.",
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
    processor_table_store: Literal["rocksdb", "memory"] = Field(
        "rocksdb",
        description="Where the processor keeps its tables (identities, devices per user): "
        "`rocksdb` (RocksDB through rocksdict, files in `<data_dir>/processor-tables`, one data "
        "dir per worker; a restart reads only the changelog written since) or `memory` "
        "(rebuilt from the changelogs at every start; for tests).",
    )
    processor_max_devices_per_user: int = Field(
        500,
        description="anonymous_ids the processor links to one user (Mixpanel's Original ID "
        "Merge caps a user at 500 too); an identify past it is logged, counted in "
        "`millimetric_processor_devices_over_cap_total` and unlinked, so a forget of the user "
        "still finds every device the processor stitches.",
    )
    processor_max_record_bytes: int = Field(
        1_048_576,
        description="Largest record the processor sends (at most the broker's "
        "`message.max.bytes`): a larger enriched record is dead-lettered, not retried.",
    )
    sink_batch_rows: int = Field(20_000, description="Rows per ClickHouse insert, at most.")
    sink_batch_seconds: float = Field(1.0, description="Longest a row waits in the sink's batch.")
    sink_retry_max_s: float = Field(
        30.0, description="Cap of the sink's exponential backoff while ClickHouse refuses."
    )
    sink_insert_attempts: int = Field(
        5,
        description="Attempts of an insert that fails with an error not known to heal (not a "
        "connection, timeout or overload) before its batch is halved; a single row that still "
        "fails goes to the dead-letter topic.",
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
    host: str | None = Field(
        None,
        description="Gateway URL the `backfill` command sends to (e.g. https://ingest.example); "
        "default: this machine's gateway.",
    )
    key: SecretStr | None = Field(
        None, description="The sk_ API key the `backfill` command sends with."
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
