"""docker-compose.yml and deploy/Dockerfile checked against what the code expects (no Docker engine
runs here): services and health-gated start order, vLLM's LoRA flags and env, one adapters volume at
the same path everywhere, and every LORALOOP_* variable being a real Settings field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?[-?](?P<default>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in service.get("env_file", []):
        path = ROOT / (entry["path"] if isinstance(entry, dict) else entry)
        if isinstance(entry, dict) and not entry.get("required", True) and not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def resolve_defaults(value: str) -> str:
    """Compose interpolation with an empty shell: `${X:-d}` -> d."""
    return INTERPOLATION.sub(lambda m: m["default"] or "", value)


def test_services_and_health_gated_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "vllm", "api", "worker"}
    for name in ("postgres", "vllm", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert services["api"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "vllm": {"condition": "service_healthy"},
    }
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    # readiness, not liveness: the api is healthy only when /readyz says every component is ok
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["vllm"]["healthcheck"]["test"])


def test_vllm_runs_the_official_image_with_runtime_lora_updating(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in vllm["command"])
    assert "enable-lora" in flags and flags["port"] == "8000"
    defaults = Settings.model_fields
    assert resolve_defaults(flags["max-lora-rank"]) == str(defaults["vllm_max_lora_rank"].default)
    assert resolve_defaults(flags["max-loras"]) == str(defaults["vllm_max_loras"].default)
    assert resolve_defaults(flags["gpu-memory-utilization"]) == str(
        defaults["vllm_gpu_memory_utilization"].default
    )
    # the flag values come from the same variables that the api/worker settings read
    api_env = env_of(compose["services"]["api"])
    for flag, var in (
        ("max-lora-rank", "LORALOOP_VLLM_MAX_LORA_RANK"),
        ("max-loras", "LORALOOP_VLLM_MAX_LORAS"),
    ):
        assert INTERPOLATION.search(flags[flag])["name"] == var
        assert INTERPOLATION.search(api_env[var])["name"] == var
    reservation = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]


def test_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "8080:8080" in services["api"]["ports"]
    assert "8000:8000" in services["vllm"]["ports"]
    api_env = env_of(services["api"])
    assert api_env["LORALOOP_PORT"] == "8080" and api_env["LORALOOP_HOST"] == "0.0.0.0"


def test_adapters_volume_is_shared_at_the_same_path(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"adapters", "models", "pgdata"} <= set(compose["volumes"])
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}
        for name in ("vllm", "api", "worker")
    }
    paths = {name: m["adapters"] for name, m in mounts.items()}
    assert len(set(paths.values())) == 1, paths
    for name in ("api", "worker"):
        data_dir = env_of(services[name])["LORALOOP_DATA_DIR"]
        assert paths[name] == f"{data_dir}/adapters"  # Settings.adapters_dir, as vLLM sees it too
        base_model = env_of(services[name])["LORALOOP_BASE_MODEL"]
        assert base_model.startswith(mounts[name]["models"])
    assert "--model=/models/base" in services["vllm"]["command"]
    assert any(v.endswith(":ro") for v in services["vllm"]["volumes"] if v.startswith("adapters:"))


def test_every_loraloop_variable_is_a_settings_field(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for env_file in ("deploy/compose.env", "deploy/compose.env.example", "deploy/Dockerfile"):
        text += (ROOT / env_file).read_text()
    names = set(re.findall(r"\bLORALOOP_([A-Z0-9_]+)", text))
    assert {"DATABASE_URL", "DATA_DIR", "VLLM_URLS", "AUTH_TOKENS", "BASE_MODEL"} <= names
    unknown = sorted(n for n in names if n.lower() not in Settings.model_fields)
    assert unknown == [], f"LORALOOP_* variables that Settings does not read: {unknown}"


def test_settings_parse_the_container_environment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("api", "worker"):
        env = {k: resolve_defaults(v) for k, v in env_of(compose["services"][name]).items()}
        env["LORALOOP_AUTH_TOKENS"] = "t=admin"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)
        assert settings.vllm_urls == ["http://vllm:8000"]
        assert settings.database_url.startswith("postgresql+psycopg://loraloop:")
        assert "@postgres:5432/" in settings.database_url
        assert settings.adapters_dir == Path("/var/lib/loraloop/adapters")
    postgres_env = compose["services"]["postgres"]["environment"]
    assert settings.database_url.endswith("/" + postgres_env["POSTGRES_DB"])


def test_dockerfile_migrates_then_serves() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/app/deploy/docker-entrypoint.sh"]' in dockerfile
    assert 'CMD ["serve"]' in dockerfile
    assert "-c /etc/loraloop-constraints.txt" in dockerfile
    entrypoint = (ROOT / "deploy" / "docker-entrypoint.sh").read_text().splitlines()
    commands = [line for line in entrypoint if line and not line.startswith(("#", "set "))]
    assert commands == ["loraloop db upgrade", 'exec loraloop "$@"']
    assert (ROOT / "deploy" / "docker-entrypoint.sh").stat().st_mode & 0o111
