"""Webhook signatures: verify a delivery's raw bytes with its provider's row of the schemes table.

`webhook_schemes.toml` says how each provider signs; this module has one verifier for all of
them. Every comparison is `hmac.compare_digest`; a timestamp is judged only once a signature over
it matched, so a forger learns nothing from `stale_timestamp`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMES_FILE = Path(__file__).with_name("webhook_schemes.toml")


class SignatureError(Exception):
    """A delivery that may not proceed; `code` is `invalid_signature` or `stale_timestamp`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class Scheme:
    """One provider's row of the schemes table."""

    name: str
    signature_header: str
    signature_format: str
    signed: str
    encoding: str
    secret_encoding: str
    tolerance_s: int
    delivery_id: str
    keep_headers: tuple[str, ...]
    generated_secret: str
    mapping: dict[str, Any]
    signature_prefix: str = ""
    pair_timestamp: str = "t"
    pair_signature: str = "v1"
    timestamp_header: str = ""


def load_schemes(path: Path = SCHEMES_FILE) -> dict[str, Scheme]:
    """The schemes table, checked: a bad row fails the boot, not a delivery."""
    with path.open("rb") as f:
        table = tomllib.load(f)
    schemes: dict[str, Scheme] = {}
    for name, row in table.items():
        row = {**row, "keep_headers": tuple(row["keep_headers"])}
        scheme = Scheme(name=name, **row)
        if not scheme.signed.endswith("{body}"):
            raise ValueError(f"{name}: `signed` must end with {{body}}")
        if scheme.signature_format not in ("plain", "pairs", "versioned", "bearer"):
            raise ValueError(f"{name}: unknown signature_format {scheme.signature_format!r}")
        if scheme.encoding not in ("hex", "base64"):
            raise ValueError(f"{name}: unknown encoding {scheme.encoding!r}")
        if scheme.secret_encoding not in ("utf8", "whsec_base64"):
            raise ValueError(f"{name}: unknown secret_encoding {scheme.secret_encoding!r}")
        schemes[name] = scheme
    return schemes


SCHEMES = load_schemes()


def new_secret(scheme: Scheme) -> str:
    """A fresh secret in the provider's format (`whsec_` + base64 of 24 bytes, or 32 hex)."""
    if scheme.generated_secret == "whsec":
        return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    return secrets.token_hex(32)


def hash_secret(secret: str) -> str:
    """What a bearer hook stores: the secret is compared, never used as a key, so a hash will do."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def stored_secret(scheme: Scheme, secret: str) -> str:
    """The form a secret is kept in on the keys topic: hashed for bearer, else the secret itself
    (an HMAC needs it)."""
    if scheme.secret_encoding == "whsec_base64":
        _hmac_key(scheme, secret)  # refuse a malformed whsec_ secret at creation
    return hash_secret(secret) if scheme.signature_format == "bearer" else secret


def _hmac_key(scheme: Scheme, secret: str) -> bytes:
    if scheme.secret_encoding == "utf8":
        return secret.encode()
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error as error:
        raise ValueError(f"not a whsec_<base64> secret: {error}") from None


def _header_signatures(scheme: Scheme, value: str) -> tuple[str | None, list[str]]:
    """(timestamp in the header or None, the signatures it carries)."""
    if scheme.signature_format == "pairs":
        pairs = [item.partition("=") for item in value.split(",")]
        stamps = [v.strip() for k, _, v in pairs if k.strip() == scheme.pair_timestamp]
        sigs = [v.strip() for k, _, v in pairs if k.strip() == scheme.pair_signature]
        return (stamps[0] if stamps else ""), sigs
    if scheme.signature_format == "versioned":
        entries = [item.partition(",") for item in value.split()]
        return None, [sig for version, _, sig in entries if version == "v1"]
    return None, [value.strip().removeprefix(scheme.signature_prefix)]


def _encode(scheme: Scheme, digest: bytes) -> str:
    return digest.hex() if scheme.encoding == "hex" else base64.b64encode(digest).decode()


def verify(
    scheme: Scheme,
    secrets_: list[str],
    headers: dict[str, str],
    body: bytes,
    delivery_id: str,
    now_s: float,
    signature_header: str | None = None,
) -> None:
    """Raise SignatureError unless one of the hook's secrets signed these raw bytes recently."""
    value = headers.get(signature_header or scheme.signature_header)
    if not value:
        raise SignatureError("invalid_signature")
    if scheme.signature_format == "bearer":
        kind, _, presented = value.partition(" ")
        digest = hash_secret(presented.strip()) if kind.lower() == "bearer" else ""
        if not any(hmac.compare_digest(digest.encode(), s.encode()) for s in secrets_):
            raise SignatureError("invalid_signature")
        return
    stamp, signatures = _header_signatures(scheme, value)
    if scheme.timestamp_header:
        stamp = headers.get(scheme.timestamp_header, "")
    prefix = scheme.signed[: -len("{body}")].format(id=delivery_id, timestamp=stamp or "")
    signed = prefix.encode() + body
    expected = [
        _encode(scheme, hmac.new(_hmac_key(scheme, s), signed, hashlib.sha256).digest())
        for s in secrets_
    ]
    # Every pair is compared (no early exit): the time taken says nothing about which matched.
    matches = [
        hmac.compare_digest(e.encode(), sig.encode("utf-8", "replace"))
        for e in expected
        for sig in signatures
    ]
    if not any(matches):
        raise SignatureError("invalid_signature")
    if scheme.tolerance_s:
        if stamp is None or not stamp.isdigit():
            raise SignatureError("invalid_signature")
        if abs(now_s - int(stamp)) > scheme.tolerance_s:
            raise SignatureError("stale_timestamp")


def markdown_table() -> str:
    """The README's providers table."""
    lines = [
        "| provider | signature header | signed content | timestamp tolerance | delivery id | "
        "default event |",
        "|---|---|---|---|---|---|",
    ]
    for s in SCHEMES.values():
        tolerance = f"{s.tolerance_s} s" if s.tolerance_s else "none (unsigned)"
        event = ".".join([s.mapping["event_prefix"], *(f"<{p}>" for p in s.mapping["event"])])
        signed = "secret, compared (stored hashed)" if s.signature_format == "bearer" else (
            f"HMAC-SHA256 ({s.encoding}) of `{s.signed}`"
        )  # fmt: skip
        lines.append(
            f"| `{s.name}` | `{s.signature_header}` | {signed} | {tolerance} | "
            f"`{s.delivery_id}` | `{event}` |"
        )
    return "\n".join(lines)
