"""Secrets a single-machine setup generates once and keeps in its data directory."""

from __future__ import annotations

import secrets
from pathlib import Path


def read_or_create(path: Path) -> str:
    """The secret in `path`, generated there (32 random bytes, hex, mode 0600) when absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()
