"""The README's tables are rendered from the tables the code uses; they must not drift.

Run `UPDATE_README=1 pytest tests/test_docs.py` to rewrite them after changing a table.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gateway import rate_limit, segment, webhook_schemes
from ingest import errors, metrics, settings, topics

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = {
    "topics": topics.markdown_table,
    "errors": errors.markdown_table,
    "settings": settings.markdown_table,
    "limits": rate_limit.markdown_table,
    "webhooks": webhook_schemes.markdown_table,
    "segment": segment.markdown_table,
    "metrics": metrics.markdown_table,
}


def _render(text: str) -> str:
    for name, render in TABLES.items():
        text = re.sub(
            rf"<!-- table:{name} -->\n.*?<!-- /table -->",
            lambda _m, n=name, r=render: f"<!-- table:{n} -->\n{r()}\n<!-- /table -->",
            text,
            flags=re.S,
        )
    return text


def test_readme_tables_match_the_code() -> None:
    text = README.read_text()
    rendered = _render(text)
    if os.environ.get("UPDATE_README"):
        README.write_text(rendered)
        text = rendered
    assert text == rendered, (
        "README tables are stale: run UPDATE_README=1 pytest tests/test_docs.py"
    )
