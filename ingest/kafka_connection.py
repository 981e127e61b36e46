"""How every Kafka client of every stage connects: bootstrap servers, TLS and SASL, from settings.

aiokafka producers, consumers and admin clients take `client_options(...)` as keyword
arguments; Faust takes `faust_credentials(...)`. The SASL password stays a SecretStr until it is
handed to the client, so it never reaches a log line or a settings repr.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from ingest.settings import Settings

Security = Mapping[str, Any] | None  # an aiokafka client's TLS and SASL options (None: none)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the `SSL` and `SASL_SSL` protocols (None without TLS)."""
    if "SSL" not in settings.kafka_security_protocol:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    )
    if settings.kafka_ssl_certfile is not None:
        context.load_cert_chain(
            str(settings.kafka_ssl_certfile),
            str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    return context


def client_options(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments every aiokafka client of a stage is made with."""
    return {"bootstrap_servers": bootstrap, **security_options(settings)}


def security_options(settings: Settings) -> dict[str, Any]:
    """The TLS and SASL keyword arguments of an aiokafka client (empty over plaintext)."""
    options: dict[str, Any] = {}
    if settings.kafka_security_protocol != "PLAINTEXT":
        options["security_protocol"] = settings.kafka_security_protocol
    if (context := ssl_context(settings)) is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        if settings.kafka_sasl_username is None or settings.kafka_sasl_password is None:
            raise ValueError(
                "MILLIMETRIC_KAFKA_SASL_USERNAME and MILLIMETRIC_KAFKA_SASL_PASSWORD are "
                f"required with {settings.kafka_security_protocol}"
            )
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def group_options(settings: Settings) -> dict[str, Any]:
    """The session and heartbeat keyword arguments of an aiokafka consumer in a group."""
    session_ms = int(settings.kafka_session_timeout_s * 1000)
    return {"session_timeout_ms": session_ms, "heartbeat_interval_ms": session_ms // 5}


def faust_credentials(settings: Settings) -> Any:
    """The same connection for Faust's `broker_credentials` (None over plaintext)."""
    import faust

    context = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        options = security_options(settings)
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    return faust.SSLCredentials(context) if context is not None else None
