"""Settings: one frozen object per process, read from `MILLIMETRIC_*` env vars (and CLI flags).

This is the only module that reads the environment. The README's settings table is rendered from
`Settings.model_fields` and checked by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
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
    envelopes: bool = Field(
        True,
        description="Carry events on the raw and enriched topics in per-partition envelopes "
        "(one record per partition per request or processor step, docs/RECORDS.md); false: "
        "one record per event, as before version 2 (readers take both kinds either way).",
    )
    kafka_min_insync_replicas: int | None = Field(
        None,
        description="`min.insync.replicas` of the topics a stage creates (2 in production, with "
        "a replication factor of 3, so an `acks=all` write survives losing a broker); unset: "
        "the broker's default.",
    )
    kafka_namespace: str = Field(
        "",
        description="Prefix of every topic and consumer-group name (`NS.millimetric.raw`, "
        "`NS.millimetric-sink`), for several pipelines on one Kafka cluster; empty: none.",
    )
    kafka_session_timeout_s: float = Field(
        10.0,
        description="Consumer-group session of the processor and sink (heartbeats every fifth "
        "of it): a killed member's partitions move after it, and on Tansu a member joining a "
        "group waits half of it.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How every Kafka client connects: `SSL` (TLS), `SASL_SSL` (TLS and a "
        "password: use this in production), `SASL_PLAINTEXT`, or `PLAINTEXT` (dev).",
    )
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle that signs the brokers' certificates; unset: the system's."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate, for brokers that require mutual TLS."
    )
    kafka_ssl_keyfile: Path | None = Field(None, description="The client certificate's key.")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism, with a `SASL_*` security protocol."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (a secret: never logged)."
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
    clickhouse_password: SecretStr | None = Field(
        None,
        description="ClickHouse password (a secret: never logged). A password in "
        "`MILLIMETRIC_CLICKHOUSE_URL` is moved here, so the URL never carries it.",
    )
    clickhouse_secure: bool = Field(
        False, description="Connect to the ClickHouse server over TLS (its secure port, 9440)."
    )
    clickhouse_ca_certs: Path | None = Field(
        None, description="CA bundle that signs the ClickHouse server's certificate."
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
    header_timeout_s: float = Field(
        10.0,
        description="Longest a connection may take to send a request's headers, from its "
        "opening or the request's first byte; a slower client is disconnected without an "
        "answer (nginx's `client_header_timeout`; uvicorn alone has no such bound).",
    )
    body_timeout_s: float = Field(
        10.0,
        description="Longest the gateway waits for a request's whole body; a slower client is "
        "answered 408 and disconnected.",
    )
    max_in_flight: int = Field(
        1000,
        description="Requests one gateway process handles at once; past it, 503 `overloaded` "
        "with Retry-After.",
    )
    invalid_request_rate: float = Field(
        1.0,
        description="Invalid requests (4xx after authentication) a key may send per second "
        "(for a pk_ key: per client IP); past its burst, its requests get 429 before their "
        "body is read.",
    )
    invalid_request_burst: int = Field(
        20, description="Invalid requests a key (pk_: a client IP) may send in a burst."
    )
    track_max_bytes: int = Field(32_768, description="Body limit of /v1/track and /v1/identify.")
    batch_max_bytes: int = Field(1_048_576, description="Body limit of /v1/batch.")
    hook_max_bytes: int = Field(
        1_048_576,
        description="Body limit of /v1/hooks/{hook_id}, after decompression (larger: 413).",
    )
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
    processor_batch_size: int = Field(
        1000,
        description="Records the processor takes per step, and events it enriches and publishes "
        "at a time (a step of envelopes goes in parts of about this many events).",
    )
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
    forget_batch_max: int = Field(
        500,
        description="Most forgets carried out together: one grace period and one delete per "
        "table for all of them.",
    )
    forget_mutation_timeout_s: float = Field(
        300.0,
        description="Longest a forget waits for its own ClickHouse deletes (mutations) to "
        "finish; past it the forget stays `pending` with that reason and is checked again.",
    )
    forget_retry_max_s: float = Field(
        300.0, description="Cap of the backoff between attempts of a forget that failed."
    )
    forget_audit_key: SecretStr | None = Field(
        None,
        description="Secret key of the HMAC-SHA256 that `forget_audit` keeps of each subject. "
        "Required by `sink` with a ClickHouse server; with embedded chdb, one is generated "
        "into `<data_dir>/forget_audit_key` when unset.",
    )
    retention_days: int | None = Field(
        None,
        description="Days `events` keeps rows (a TTL, on servers that have TTL); unset: "
        "forever. Aggregates are kept.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Bind address of every stage's metrics port (`0.0.0.0` for a Prometheus "
        "elsewhere); `millimetric status` reads the stages there.",
    )
    gateway_metrics_port: int | None = Field(
        None,
        description="Serve the gateway's Prometheus metrics (and `/health`, `/ready`) on this "
        "port, never on the public port; unset: none.",
    )
    processor_metrics_port: int | None = Field(
        None,
        description="Serve the processor's Prometheus metrics (and `/health`, `/ready`) on "
        "this port; unset: none.",
    )
    sink_metrics_port: int | None = Field(
        None,
        description="Serve the sink's Prometheus metrics (and `/health`, `/ready`) on this "
        "port; unset: none.",
    )
    status_metrics_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Where `millimetric status` reads each stage (JSON, e.g. "
        '`{"gateway": "http://gw:9101/metrics"}`); a stage not named: its metrics port on '
        "MILLIMETRIC_METRICS_HOST, or the running `dev`'s.",
    )
    lag_interval_s: float = Field(
        5.0, description="How often the processor and sink measure their consumer lag."
    )
    ready_max_lag_s: float | None = Field(
        None,
        description="The processor and sink report not ready (`millimetric_ready` 0) while "
        "their oldest uncommitted record is older than this; unset: lag never makes them unready.",
    )
    heartbeat_interval_s: float | None = Field(
        None,
        description="Every sink puts a heartbeat on the raw topic this often; it crosses the "
        "processor back to the sinks (never into a table or a count), so freshness is known "
        "without traffic (`millimetric_heartbeat_*`); unset: none.",
    )
    host: str | None = Field(
        None,
        description="Gateway URL the `backfill` command sends to (e.g. https://ingest.example); "
        "default: this machine's gateway.",
    )
    key: SecretStr | None = Field(
        None, description="The sk_ API key the `backfill` command sends with."
    )
    read_max_range_days: int = Field(
        93,
        ge=1,
        description="Longest `from`..`to` range the read API (/v1/stats, /v1/sources, "
        "/v1/events) answers; a longer one is a 400 naming `to`.",
    )
    read_max_rows: int = Field(
        1000,
        ge=1,
        description="Most rows one read API answer holds: /v1/events' largest `limit`, and "
        "the top /v1/sources rows by sessions.",
    )
    read_cache_s: float = Field(
        5.0,
        ge=0,
        description="Seconds a read API answer is reused for the same project and parameters "
        "(0: no cache).",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a read API query may run in ClickHouse before the answer is a 503.",
    )
    posthog_api_key: SecretStr | None = Field(
        None,
        description="A PostHog project API key: forward enriched events to PostHog's batch "
        "capture API (README, Destinations); unset: no PostHog destination.",
    )
    posthog_host: str = Field(
        "https://us.i.posthog.com",
        description="PostHog's ingestion host (`https://eu.i.posthog.com` for the EU cloud, or "
        "a self-hosted PostHog's URL).",
    )
    posthog_personal_api_key: SecretStr | None = Field(
        None,
        description="A PostHog personal API key (`phx_...`, scope person:write) with "
        "MILLIMETRIC_POSTHOG_PROJECT_ID: forward forgets to PostHog's person deletion.",
    )
    posthog_project_id: str | None = Field(
        None, description="The PostHog project's id, for person deletion."
    )
    posthog_app_host: str = Field(
        "https://us.posthog.com",
        description="PostHog's app (API) host, for person deletion (`https://eu.posthog.com`, "
        "or a self-hosted URL).",
    )
    mixpanel_token: SecretStr | None = Field(
        None,
        description="A Mixpanel project token: forward enriched events to Mixpanel; unset: no "
        "Mixpanel destination.",
    )
    mixpanel_host: str = Field(
        "https://api.mixpanel.com",
        description="Mixpanel's API host (`https://api-eu.mixpanel.com` for EU residency).",
    )
    mixpanel_api_secret: SecretStr | None = Field(
        None,
        description="The Mixpanel project's API secret: events go to the import API (any age, "
        "per-event errors); unset: the track API (events up to 5 days old).",
    )
    mixpanel_gdpr_token: SecretStr | None = Field(
        None,
        description="A Mixpanel OAuth token for the GDPR API: forward forgets to Mixpanel's "
        "data deletion.",
    )
    mixpanel_app_host: str = Field(
        "https://mixpanel.com",
        description="Mixpanel's app host, for data deletion (`https://eu.mixpanel.com` for EU "
        "residency).",
    )
    amplitude_api_key: SecretStr | None = Field(
        None,
        description="An Amplitude project API key: forward enriched events to Amplitude's HTTP "
        "V2 API; unset: no Amplitude destination.",
    )
    amplitude_host: str = Field(
        "https://api2.amplitude.com",
        description="Amplitude's API host (`https://api.eu.amplitude.com` for the EU data centre).",
    )
    amplitude_secret_key: SecretStr | None = Field(
        None,
        description="The Amplitude project's secret key: forward forgets (of identified "
        "users) to Amplitude's user deletion API.",
    )
    amplitude_app_host: str = Field(
        "https://amplitude.com",
        description="Amplitude's host for user deletion (`https://analytics.eu.amplitude.com` "
        "for the EU data centre).",
    )
    tracking_webhook_url: str | None = Field(
        None,
        description="POST enriched events, in JSON batches, to this URL; unset: no webhook "
        "destination.",
    )
    tracking_webhook_auth: SecretStr | None = Field(
        None, description="Sent as the webhook's `Authorization` header (e.g. `Bearer ...`)."
    )
    tracking_webhook_secret: SecretStr | None = Field(
        None,
        description="A `whsec_` secret: sign each webhook batch the Standard Webhooks way "
        "(`webhook-id`, `webhook-timestamp`, `webhook-signature`).",
    )
    destinations_batch_events: int = Field(
        50, ge=1, description="Events per destination request, at most."
    )
    destinations_batch_seconds: float = Field(
        10.0, gt=0, description="Longest an event waits in a destination's batch."
    )
    destinations_include_test: bool = Field(
        False,
        description="Forward events sent with test keys too (records marked `env: test`); "
        "otherwise destinations skip them.",
    )
    destinations_attempts: int = Field(
        8,
        ge=1,
        description="Tries of a batch a provider answers 429, 5xx or not at all (honouring "
        "Retry-After) before the destination pauses for MILLIMETRIC_DESTINATIONS_PAUSE_S and "
        "tries again: a batch is never skipped.",
    )
    destinations_retry_max_s: float = Field(
        60.0, description="Cap of a destination's backoff (and of a Retry-After it honours)."
    )
    destinations_pause_s: float = Field(
        60.0, description="A destination's pause after its attempts ran out, before the next."
    )
    destinations_timeout_s: float = Field(
        30.0, description="Longest a destination waits for a provider's answer."
    )
    destinations_secret_key: SecretStr | None = Field(
        None,
        description="Key that encrypts per-project destinations' credentials on the keys topic "
        "(`millimetric destinations add`; any string, stretched to a Fernet key). Unset: one is "
        "generated into `<data_dir>/destinations_key`, so `add` and `run` must share that "
        "directory; set it where they do not.",
    )
    destinations_metrics_port: int | None = Field(
        None,
        description="Serve the destinations process's Prometheus metrics (and `/health`, "
        "`/ready`) on this port; unset: none.",
    )
    log_level: str = Field("INFO", description="Python log level of every stage.")

    @model_validator(mode="before")
    @classmethod
    def _password_out_of_url(cls, values: Any) -> Any:
        """Move a password in the ClickHouse URL to `clickhouse_password` (a SecretStr)."""
        url = values.get("clickhouse_url") if isinstance(values, dict) else None
        if not url or not (parsed := urlsplit(url)).password:
            return values
        netloc = parsed.netloc.rpartition("@")[2]
        user = parsed.username
        values = {
            **values,
            "clickhouse_url": urlunsplit(
                parsed._replace(netloc=f"{user}@{netloc}" if user else netloc)
            ),
        }
        values.setdefault("clickhouse_password", unquote(parsed.password or ""))
        return values

    def destinations(self) -> list[str]:
        """The destinations switched on: those whose key setting is set."""
        keys = {
            "posthog": self.posthog_api_key,
            "mixpanel": self.mixpanel_token,
            "amplitude": self.amplitude_api_key,
            "webhook": self.tracking_webhook_url,
        }
        return [name for name, key in keys.items() if key is not None]

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
        shown = json.dumps(value) if isinstance(value, list | dict) else value
        default = "" if value is None else f"`{shown}`"
        lines.append(f"| `MILLIMETRIC_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(lines)
