"""Which webhook receivers exist: the live hooks, learned from the keys topic by the key store."""

from __future__ import annotations

from typing import Any

from ingest.records import HookRecord


class HookTable:
    """The live hooks from the keys topic: hook_id -> record (revoked ones dropped)."""

    def __init__(self) -> None:
        self._hooks: dict[str, HookRecord] = {}

    def apply(self, record: Any) -> None:
        """Apply a `hook` record from the keys topic (created, rotated or revoked)."""
        if record["revoked_at"] is not None:
            self._hooks.pop(record["hook_id"], None)
        else:
            self._hooks[record["hook_id"]] = record

    def get(self, hook_id: str) -> HookRecord | None:
        """The live hook, or None."""
        return self._hooks.get(hook_id)
