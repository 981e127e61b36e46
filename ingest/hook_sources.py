"""Where a webhook value comes from: `header.<name>` or `body.<dotted.path>`.

The gateway reads delivery ids this way and the processor's mapping reads every field this way,
so the schemes table and mapping files speak one language.
"""

from __future__ import annotations

from typing import Any


def lookup(source: str, headers: dict[str, str], body: Any) -> Any:
    """The value `source` names, or None when absent; `body` alone is the whole payload and a
    list index is a path segment of digits (`body.items.0.id`)."""
    kind, _, path = source.partition(".")
    if kind == "header":
        return headers.get(path.lower())
    if kind != "body":
        raise ValueError(f"a source is header.<name> or body.<path>, not {source!r}")
    value = body
    for part in path.split(".") if path else ():
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value
