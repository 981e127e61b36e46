#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what the tests need, then lints and tests.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests start for real: ClickHouse server 18.16, Redis, ZooKeeper (the
# replicated ClickHouse cluster), haproxy (a reverse proxy in front of the gateway, TLS in front of
# the broker and ClickHouse); wrk for benchmarks; Chromium and its driver for the browser snippet's
# tests (Selenium drives them, no download); Prometheus (and its promtool) for the operations tests.
need=()
[ -x /usr/sbin/clickhouse-server ] || need+=(clickhouse-server)
[ -x /usr/share/zookeeper/bin/zkServer.sh ] || need+=(zookeeper)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)  # the TLS tests' certificates
[ -x /usr/bin/prometheus ] || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# @segment/analytics-node for tests/test_segment_sdks.py (skipped without node or npm).
if command -v npm >/dev/null && command -v node >/dev/null; then
  (cd tests/segment_node && npm ci --no-audit --no-fund --silent)
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
