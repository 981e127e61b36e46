"""The tests' own helpers: a wrong query fails at once with ClickHouse's message, instead of
polling until a timeout that reports an empty answer; on an external broker each test gets
topic and consumer-group names of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.services import ClickHouseServer
from ingest.topics import namespaced, topic
from tests.services import NAMESPACE, Pipeline, not_ready, stage_env


def test_wait_for_fails_at_once_on_a_query_error(
    ch_server: str | ClickHouseServer, tmp_path: Path
) -> None:
    url = ch_server.url("default") if isinstance(ch_server, ClickHouseServer) else ch_server
    p = Pipeline("127.0.0.1:9", url, tmp_path)  # no stage started: queries run in this process
    try:
        # Were the error polled through, this would wait the whole 300 s and report "gave ''".
        with pytest.raises(AssertionError, match=r"(?s)^'SELEC 1' failed: .*Syntax error"):
            p.wait_for("SELEC 1", "1\n", timeout=300)
    finally:
        p.stop()


@pytest.mark.parametrize(
    ("error", "polled"),
    [
        ("Code: 60. DB::Exception: Table t_1.events doesn't exist.", True),
        ("Code: 81. DB::Exception: Database t_1 doesn't exist (UNKNOWN_DATABASE)", True),
        ("<urlopen error [Errno 111] Connection refused>", True),
        ("Code: 62. DB::Exception: Syntax error: failed at position 1 ('SELEC')", False),
        ("Code: 47. DB::Exception: Missing columns: 'evnt' while processing query", False),
    ],
)
def test_only_not_there_yet_errors_are_polled_through(error: str, polled: bool) -> None:
    assert not_ready(error) is polled


def test_a_namespace_gives_fresh_topic_and_group_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """What conftest's fresh_broker relies on with an external broker (MILLIMETRIC_TEST_KAFKA)."""
    assert topic("raw").name == "millimetric.raw"
    monkeypatch.setenv(NAMESPACE, "t1")
    assert topic("raw").name == "t1.millimetric.raw"
    assert namespaced("millimetric-sink") == "t1.millimetric-sink"
    assert stage_env({})[NAMESPACE] == "t1"  # the stages use the test's names too
