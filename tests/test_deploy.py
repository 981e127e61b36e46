"""Static checks of deploy/ and the Dockerfile (no Docker engine or cluster here): the compose
file against the compose-spec schema, the manifests against Kubernetes' schemas, the Dockerfile
through hadolint, and every setting, port and probe path they name against the code."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.app import build_app
from ingest.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent
COMPOSE = DEPLOY / "docker-compose.yml"
KUBERNETES_VERSION = "1.33.0"
STAGES = ("gateway", "processor", "sink", "destinations")
# A probe or health check that runs inside the container: a GET on a loopback URL.
LOOPBACK_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w/.-]*)")


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in _yaml_documents(path):
                yield path, doc


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _stage_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _compose()["services"].items()
        if service.get("image", "").startswith("millimetric-ingest")
    }


def _deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _manifests() if doc["kind"] == "Deployment"}


def _configmap() -> dict[str, str]:
    return next(doc["data"] for _, doc in _manifests() if doc["kind"] == "ConfigMap")


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\bMILLIMETRIC_[A-Z0-9_]+\b", text))


def _effective_port(env: dict[str, str], name: str) -> int | None:
    """The port a stage listens on with this environment (its setting, else the default)."""
    value = env.get(f"MILLIMETRIC_{name.upper()}")
    if value is not None:
        return int(value)
    default = Settings.model_fields[name].default
    return None if default is None else int(default)


def _gateway_paths() -> set[str]:
    app = build_app(Settings(ip_salt="x"), "127.0.0.1:1")
    return {route.path for route in app.starlette.routes}


def _processor_paths() -> set[str]:
    """The paths the processor's Faust app serves (`@app.page(...)` in processors/app.py)."""
    tree = ast.parse((ROOT / "processors" / "app.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "page"
        and isinstance(node.args[0], ast.Constant)
    }


def _served(stage: str, env: dict[str, str]) -> tuple[int | None, set[str]]:
    """(port, paths) a stage serves over HTTP with this environment."""
    if stage == "gateway":
        return _effective_port(env, "gateway_port"), _gateway_paths()
    if stage == "processor":
        return _effective_port(env, "processor_port"), _processor_paths()
    if stage == "destinations":
        return _effective_port(env, "destinations_metrics_port"), {"/health", "/ready", "/metrics"}
    return _effective_port(env, "sink_metrics_port"), {"/health", "/ready", "/metrics"}


def _check_loopback_probes(stage: str, env: dict[str, str], texts: list[str]) -> int:
    port, paths = _served(stage, env)
    found = 0
    for text in texts:
        for probe_port, path in LOOPBACK_URL.findall(text):
            assert int(probe_port) == port, f"{stage} probes port {probe_port}, serves {port}"
            assert path in paths, f"{stage} probes {path}, serves {sorted(paths)}"
            found += 1
    return found


def test_compose_file_follows_the_compose_spec() -> None:
    out = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_follow_the_kubernetes_schemas(path: Path) -> None:
    for doc in _yaml_documents(path):
        if doc["kind"] == "Kustomization":
            listed = set(doc["resources"])
            assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [BIN / "hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_gateway_listens_on_every_interface() -> None:
    assert "MILLIMETRIC_GATEWAY_HOST=0.0.0.0" in (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["millimetric"]' in (ROOT / "Dockerfile").read_text()


def test_every_setting_deploy_names_exists() -> None:
    known = {f"MILLIMETRIC_{name.upper()}" for name in Settings.model_fields}
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "Dockerfile"]
    named = {name: path for path in files for name in _env_names(path.read_text())}
    assert named, "deploy/ names no setting"
    unknown = {name: str(path.relative_to(ROOT)) for name, path in named.items()}
    assert {n: p for n, p in unknown.items() if n not in known} == {}


def test_compose_stages_start_with_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _stage_services()
    commands = sorted(s["command"][0] for s in services.values())
    assert commands == ["destinations", "gateway", "gateway", "processor", "sink"]
    for name, service in services.items():
        env = {
            key: re.sub(r"\$\{(\w+):[-?]([^}]*)\}", "secret", str(value))
            for key, value in service["environment"].items()
        }
        with monkeypatch.context() as patch:
            for key in _env_names(" ".join(os.environ)):
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            settings = Settings()
        stage = service["command"][0]
        assert settings.kafka_bootstrap_servers, name
        assert settings.kafka_idempotence, f"{name}: idempotent producers must be on"
        if stage == "processor":
            assert settings.ip_salt_value(), name
        if stage in ("sink", "destinations"):  # destinations read the suppressions table
            assert settings.clickhouse_url, name
        if stage == "destinations":
            assert service["command"] == ["destinations", "run"]
            assert service["profiles"] == ["destinations"], "destinations are opt-in"
        checks = [" ".join(service.get("healthcheck", {}).get("test", []))]
        assert _check_loopback_probes(stage, env, checks) == 1, name


def test_proxy_sends_to_every_gateway_on_its_port() -> None:
    services = _stage_services()
    gateways = {n: s for n, s in services.items() if s["command"] == ["gateway"]}
    upstreams = re.findall(r"server ([\w-]+):(\d+)", (DEPLOY / "nginx.conf").read_text())
    assert {host for host, _ in upstreams} == set(gateways)
    for host, port in upstreams:
        env = {k: str(v) for k, v in gateways[host]["environment"].items()}
        assert int(port) == _effective_port(env, "gateway_port")


def test_deployments_probe_what_the_stages_serve() -> None:
    config = _configmap()
    deployments = _deployments()
    assert set(deployments) == set(STAGES)
    secret_keys = {
        line.split("=", 1)[0]
        for line in (K8S / "secret.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert {
        "MILLIMETRIC_IP_SALT",
        "MILLIMETRIC_FORGET_AUDIT_KEY",
        "MILLIMETRIC_CLICKHOUSE_URL",
        "MILLIMETRIC_DESTINATIONS_SECRET_KEY",
    } <= secret_keys
    for stage, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 20
        (container,) = pod["containers"]
        assert container["args"] == ([stage, "run"] if stage == "destinations" else [stage])
        assert container["resources"]["requests"] and container["resources"]["limits"]
        env = config | {e["name"]: e["value"] for e in container.get("env", [])}
        port, paths = _served(stage, env)
        probes = [container[p] for p in ("readinessProbe", "livenessProbe") if p in container]
        assert len(probes) == 2, stage
        for probe in probes:
            if "httpGet" in probe:
                named = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert named.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == port
                assert probe["httpGet"]["path"] in paths
            else:
                assert _check_loopback_probes(stage, env, [" ".join(probe["exec"]["command"])])
        if stage == "gateway":
            assert {p["httpGet"]["path"] for p in probes} == {"/health", "/ready"}


def test_gateway_autoscales_and_every_stage_has_a_disruption_budget() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in _manifests()}
    assert ("HorizontalPodAutoscaler", "gateway") in kinds
    assert {("PodDisruptionBudget", stage) for stage in STAGES} <= kinds


def test_prometheus_scrapes_every_stage_on_its_metrics_port() -> None:
    jobs = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in jobs for c in job["static_configs"] for t in c["targets"]}
    for name, service in _stage_services().items():
        stage = service["command"][0]
        env = {k: str(v) for k, v in service["environment"].items()}
        assert f"{name}:{_effective_port(env, f'{stage}_metrics_port')}" in targets, name
