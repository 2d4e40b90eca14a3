"""docker-compose.yml, checked by a real Compose implementation (no Docker engine needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agents.endpoints import load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """The Compose command: the docker CLI plugin if it works, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return [legacy]
    pytest.skip(
        "no Compose implementation: neither `docker compose` (the CLI plugin) nor "
        "`docker-compose` is installed (Debian: apt-get install -y --no-install-recommends "
        "docker-compose)"
    )


def _config(compose: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    command = [*compose, "--file", str(path), "config", "--quiet"]
    return subprocess.run(command, cwd=path.parent, capture_output=True, text=True, timeout=60)


def test_docker_compose_yml_is_valid(compose: list[str]) -> None:
    done = _config(compose, COMPOSE_FILE)
    assert done.returncode == 0, done.stderr
    assert "warn" not in done.stderr.lower(), done.stderr


def test_the_validator_rejects_a_broken_file(compose: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("depends_on:", "depends_onn:", 1))
    done = _config(compose, broken)
    assert done.returncode != 0
    assert "depends_onn" in done.stdout + done.stderr


def test_the_files_the_services_use_exist_and_load() -> None:
    text = COMPOSE_FILE.read_text()
    assert "build: ." in text
    assert (ROOT / "Dockerfile").is_file()
    assert "./docker/endpoints.toml:/etc/paymaster/endpoints.toml:ro" in text
    # The workers read this file at start; a field it no longer accepts stops them all.
    config = load_config(ROOT / "docker" / "endpoints.toml", env={})
    assert config.default_endpoint.base_url == "http://llama:8080/v1"
    assert '"--port", "8080"' in text


def test_the_observability_profile_adds_prometheus_and_grafana(compose: list[str]) -> None:
    import yaml  # comes with langchain-core

    command = [*compose, "--file", str(COMPOSE_FILE), "--profile", "observability", "config"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"prometheus", "grafana", "worker"} <= set(services)
    # Only under the profile: a plain `docker compose up` starts neither.
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]
    assert "profiles" not in services["worker"]
    text = COMPOSE_FILE.read_text()
    for mounted in (
        "docker/prometheus.yml",
        "docker/grafana/provisioning",
        "docs/grafana-dashboard.json",
    ):
        assert f"./{mounted}:" in text
        assert (ROOT / mounted).exists(), mounted
    # Prometheus scrapes the port the workers serve /metrics on.
    assert '"--metrics-port", "9464"' in text
    assert "port: 9464" in (ROOT / "docker" / "prometheus.yml").read_text()


def test_the_cluster_profile_adds_a_redis_cluster_and_its_workers(compose: list[str]) -> None:
    import yaml

    command = [*compose, "--file", str(COMPOSE_FILE), "--profile", "cluster", "config"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    nodes = {"redis-node-1", "redis-node-2", "redis-node-3"}
    added = {*nodes, "redis-cluster-create", "cluster-worker"}
    assert added <= set(services)
    for name in added:
        assert services[name]["profiles"] == ["cluster"], name
    # The default set (what a plain `docker compose up` starts) is what it was.
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"redis", "llama", "worker"}
    assert services["worker"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert set(services["worker"]["depends_on"]) == {"redis", "llama"}
    for name in nodes:
        args = services[name]["command"]
        assert args[args.index("--cluster-enabled") + 1] == "yes"
        # A node announces its service name, which every container resolves: a client
        # inside the network follows MOVED to it.
        assert args[args.index("--cluster-announce-hostname") + 1] == name
        assert args[args.index("--cluster-preferred-endpoint-type") + 1] == "hostname"
    create = services["redis-cluster-create"]
    assert {n: c["condition"] for n, c in create["depends_on"].items()} == dict.fromkeys(
        nodes, "service_healthy"
    )
    script = " ".join(create["command"])
    assert "--cluster create" in script
    assert "--cluster-yes" in script
    worker = services["cluster-worker"]
    assert worker["environment"]["REDIS_URL"] == "redis://redis-node-1:6379"
    assert worker["depends_on"]["redis-cluster-create"]["condition"] == (
        "service_completed_successfully"
    )
