"""`millimetric classify`: how a visit would be attributed, as JSON, for one URL or for each JSON
line of stdin (the classifier itself is processors/classify.py)."""

from __future__ import annotations

import json
from typing import IO, Any

from processors.classify import default_classifier


def run_classify_cli(url: str | None, referrer: str | None, stdin: IO[str], stdout: IO[str]) -> int:
    """`millimetric classify`: one JSON result for --url, else one per JSON line of stdin.

    A bad stdin line yields {"error": ..., "line": n} in its place; returns 1 if any line
    was bad, else 0.
    """
    clf = default_classifier()
    if url is not None:
        stdout.write(json.dumps(clf.as_dict(clf.classify(url, referrer))))
        stdout.write("\n")
        return 0
    status = 0
    for n, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("expected a JSON object with url and referrer")
            url_in, ref_in = item.get("url"), item.get("referrer")
            if not all(v is None or isinstance(v, str) for v in (url_in, ref_in)):
                raise ValueError("url and referrer must be strings or null")
            result: dict[str, Any] = clf.as_dict(clf.classify(url_in, ref_in))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError; absurdly nested JSON
            result, status = {"error": str(exc), "line": n}, 1
        stdout.write(json.dumps(result))  # ASCII escapes: lone surrogates stay writable
        stdout.write("\n")
    return status
