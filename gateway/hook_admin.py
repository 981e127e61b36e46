"""Webhook receiver administration (`millimetric hooks ...`): hook records on the keys topic.

Hooks live where keys live, so every gateway follows them the same way. An HMAC needs the secret
itself, so HMAC secrets are stored as given: the keys topic must be readable by gateways and
administrators only. A bearer hook's secret is only compared, so it is stored as a SHA-256.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from gateway.key_admin import ALPHABET, publish_key_records, read_key_records
from gateway.webhook_schemes import SCHEMES, new_secret, stored_secret
from ingest.records import HookRecord


def new_hook_id() -> str:
    """`hk_` and 24 base62 characters: the id is in the URL, so it is not guessable either."""
    return "hk_" + "".join(secrets.choice(ALPHABET) for _ in range(24))


def current_hooks(records: list[Any]) -> dict[str, HookRecord]:
    """The latest record of every hook (what compaction keeps), revoked ones included."""
    return {r["hook_id"]: r for r in records if r.get("record") == "hook"}


async def _live_hook(bootstrap: str, hook_id: str) -> HookRecord:
    hook = current_hooks(await read_key_records(bootstrap)).get(hook_id)
    if hook is None or hook["revoked_at"] is not None:
        raise ValueError(f"no live hook {hook_id!r}")
    return hook


def _secret(provider: str, given: str | None) -> tuple[str, str | None]:
    """(stored form, the secret to print or None when the caller gave it)."""
    scheme = SCHEMES[provider]
    if given is not None:
        return stored_secret(scheme, given), None
    if not scheme.generated_secret:
        raise ValueError(f"{provider} issues the signing secret: pass it with --secret")
    fresh = new_secret(scheme)
    return stored_secret(scheme, fresh), fresh


async def create_hook(
    bootstrap: str,
    project: str,
    provider: str,
    secret: str | None,
    mapping: dict[str, Any] | None,
    signature_header: str | None = None,
    idempotence: bool = False,
) -> tuple[HookRecord, str | None]:
    """Create a hook; returns it and the generated secret (None when `secret` was given)."""
    if provider not in SCHEMES:
        raise ValueError(f"unknown provider {provider!r}; one of {', '.join(SCHEMES)}")
    if signature_header is not None and provider != "generic":
        raise ValueError("--signature-header applies to generic hooks only")
    stored, fresh = _secret(provider, secret)
    record: HookRecord = {
        "v": 1,
        "record": "hook",
        "hook_id": new_hook_id(),
        "project": project,
        "provider": provider,
        "secrets": [stored],
        "signature_header": signature_header.lower() if signature_header else None,
        "mapping": mapping,
        "created_at": int(time.time() * 1000),
        "revoked_at": None,
    }
    await publish_key_records(bootstrap, [record], idempotence)
    return record, fresh


async def rotate_hook(
    bootstrap: str, hook_id: str, secret: str | None, idempotence: bool = False
) -> tuple[HookRecord, str | None]:
    """Add a secret in front of the hook's others; all stay valid until `retire_old_secrets`."""
    hook = await _live_hook(bootstrap, hook_id)
    stored, fresh = _secret(hook["provider"], secret)
    record: HookRecord = {**hook, "secrets": [stored, *hook["secrets"]]}
    await publish_key_records(bootstrap, [record], idempotence)
    return record, fresh


async def retire_old_secrets(bootstrap: str, hook_id: str, idempotence: bool = False) -> HookRecord:
    """Keep only the newest secret (the end of a rotation)."""
    hook = await _live_hook(bootstrap, hook_id)
    record: HookRecord = {**hook, "secrets": hook["secrets"][:1]}
    await publish_key_records(bootstrap, [record], idempotence)
    return record


async def revoke_hook(bootstrap: str, hook_id: str, idempotence: bool = False) -> HookRecord:
    """Revoke the hook: its URL answers 404 from then on."""
    hook = await _live_hook(bootstrap, hook_id)
    record: HookRecord = {**hook, "secrets": [], "revoked_at": int(time.time() * 1000)}
    await publish_key_records(bootstrap, [record], idempotence)
    return record
