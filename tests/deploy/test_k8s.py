"""deploy/k8s/: the manifests parse, and their commands, settings, probes and ports pass the same
checks as the compose file's (no cluster here)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.deployfiles import (
    DEPLOY,
    ROOT,
    SETTING_NAMES,
    Command,
    dockerfile,
    gateway_routes,
    parse_command,
)

K8S = DEPLOY / "k8s"


def _kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _documents() -> list[dict[str, Any]]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _secret_keys() -> set[str]:
    """The keys of the Secret `ordergate`, as kustomization.yaml's kubectl line makes it."""
    text = (K8S / "kustomization.yaml").read_text()
    assert "kubectl create secret generic ordergate " in text
    return set(re.findall(r"--from-literal=([A-Z_]+)=", text))


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def _containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) of every Deployment and Job."""
    out = []
    for d in _documents():
        if d["kind"] in ("Deployment", "Job"):
            out += [(d, c) for c in d["spec"]["template"]["spec"]["containers"]]
    return out


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: its ConfigMap, the Secret (stand-in values), env."""
    config_maps = _by_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= config_maps[source["configMapRef"]["name"]]["data"]
        else:
            assert source["secretRef"]["name"] == "ordergate"
            env |= {
                "ORDERGATE_REDIS_URL": "redis://:pw@valkey.internal:6379/0",
                "ORDERGATE_DATABASE_URL": "postgresql://ordergate:pw@pg.internal:5432/ordergate",
                "ORDERGATE_ADMIN_TOKEN": "0123456789abcdef",
            }
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    return env


def _command(container: dict[str, Any]) -> Command:
    return parse_command(container["args"], _environment(container))


def test_every_file_is_listed_and_parses() -> None:
    listed = set(_kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = sorted(d["kind"] for d in _documents())
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Job", "Service"]
    for d in _documents():
        assert d["apiVersion"] and d["metadata"]["name"], d


def test_the_secret_and_config_name_only_settings() -> None:
    assert _secret_keys() == {
        "ORDERGATE_REDIS_URL",
        "ORDERGATE_DATABASE_URL",
        "ORDERGATE_ADMIN_TOKEN",
    }
    for config in _by_kind("ConfigMap").values():
        for key in config["data"]:
            assert key.startswith("ORDERGATE_") and key[10:].lower() in SETTING_NAMES, key


def test_every_container_runs_a_real_command_under_the_image_s_init() -> None:
    commands = {}
    image = _kustomization()["images"][0]["name"]
    (user,) = [rest for i, rest in dockerfile() if i == "USER"]
    uid = re.search(rf"--uid (\d+) .*{user}", (ROOT / "Dockerfile").read_text())
    assert uid
    for workload, container in _containers():
        # args, not command: command would replace the ENTRYPOINT, and tini with it.
        assert "command" not in container, f"{workload['metadata']['name']}: use args"
        assert container["image"] == image
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid[1])
        commands[workload["metadata"]["name"]] = _command(container).name
    assert commands == {
        "ordergate-migrate": "migrate",
        "ordergate-gateway": "serve",
        "ordergate-worker": "work",
    }


@pytest.mark.parametrize("name", ["ordergate-gateway", "ordergate-worker"])
def test_probes_ask_routes_on_the_ports_the_settings_open(name: str) -> None:
    deployment = _by_kind("Deployment")[name]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = _command(container).settings
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if name == "ordergate-gateway":
        assert settings.host == "0.0.0.0"
        assert ports == {"http": settings.port, "ops": settings.ops_port}
        routes = gateway_routes()
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert "GET" in routes[get["path"]] and ports[get["port"]] == settings.port
    else:
        assert settings.host == "0.0.0.0"
        assert ports == {"metrics": settings.worker_metrics_port}
        get = container["livenessProbe"]["httpGet"]
        assert get["path"] == "/metrics" and ports[get["port"]] == settings.worker_metrics_port


def test_the_service_reaches_the_gateway_pods() -> None:
    (service,) = _by_kind("Service").values()
    deployment = _by_kind("Deployment")["ordergate-gateway"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
