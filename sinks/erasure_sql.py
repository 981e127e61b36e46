"""SQL of a forget: literals, and WHERE conditions over many people split to fit a query."""

from __future__ import annotations

from collections.abc import Iterable

# Bytes of literals per statement: far below max_query_size (256 KiB by default).
CHUNK_BYTES = 64 * 1024


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pair(project: str, value: str) -> str:
    return f"({quote(project)}, {quote(value)})"


def chunks(
    devices: Iterable[tuple[str, str]], users: Iterable[tuple[str, str]], device: str, user: str
) -> list[str]:
    """WHERE conditions matching (project, `device`) or (project, `user`) pairs, each statement's
    literals within CHUNK_BYTES."""
    out: list[str] = []
    for column, pairs in ((device, sorted(set(devices))), (user, sorted(set(users)))):
        part: list[str] = []
        size = 0
        for project, value in pairs:
            literal = _pair(project, value)
            if part and size + len(literal) > CHUNK_BYTES:
                out.append(_tuple_in(column, part))
                part, size = [], 0
            part.append(literal)
            size += len(literal) + 2
        if part:
            out.append(_tuple_in(column, part))
    return out


def _tuple_in(column: str, literals: list[str]) -> str:
    # One tuple alone would read as a tuple of scalars: repeat it to keep a set of tuples.
    listed = literals if len(literals) > 1 else literals * 2
    return f"(project, {column}) IN ({', '.join(listed)})"
