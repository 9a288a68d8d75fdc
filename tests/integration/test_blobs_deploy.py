"""docker/compose.yaml's result store: MinIO beside Redis, and every renderfarm service pointed at it through
`result_store: s3://...` (validated by docker-compose itself, then by renderfarm's own Settings)."""

from __future__ import annotations

import pytest

from renderfarm.config import Settings
from tests.integration.test_deploy_files import DOCKERFILE, _compose_config, _env_example

pytestmark = pytest.mark.integration

FARM_SERVICES = ("head", "worker", "dashboard")


@pytest.fixture(scope="module")
def rendered() -> dict:
    import yaml

    from tests.integration.test_deploy_files import ENV_EXAMPLE

    done = _compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_minio_runs_with_its_credentials_a_volume_and_a_health_check(rendered):
    minio, secrets = rendered["services"]["minio"], _env_example()
    assert "minio" in minio["image"] and "latest" not in minio["image"], "pinned, not a moving tag"
    assert minio["command"][:2] == ["server", "/data"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == secrets["MINIO_ROOT_PASSWORD"]
    assert secrets["MINIO_ROOT_PASSWORD"].startswith("CHANGE-ME")
    assert any(":/data" in str(v) or (isinstance(v, dict) and v.get("target") == "/data") for v in minio["volumes"])
    assert "healthcheck" in minio and "9000" in [str(p) for p in minio.get("expose", [])]


def test_every_farm_service_uses_minio_as_its_result_store(rendered, monkeypatch):
    secrets = _env_example()
    for name in FARM_SERVICES:
        service = rendered["services"][name]
        env = service["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == secrets["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == secrets["MINIO_ROOT_PASSWORD"]
        assert service["depends_on"]["minio"]["condition"] == "service_healthy"
        for key, value in env.items():  # what renderfarm itself makes of that environment
            if key.startswith("RENDERFARM_RESULT_STORE"):
                monkeypatch.setenv(key, value)
        settings = Settings.load()
        assert settings.result_store_url().startswith("s3://")
        assert settings.result_store_options()["endpoint_url"] == "http://minio:9000"


def test_compose_refuses_to_render_without_the_minio_password(tmp_path):
    env = tmp_path / "no-minio.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in _env_example().items() if k != "MINIO_ROOT_PASSWORD"))
    done = _compose_config(env)
    assert done.returncode != 0 and "MINIO_ROOT_PASSWORD" in done.stderr, done.stderr


def test_the_image_installs_the_s3_backend():
    assert 'pip install . "boto3>=' in DOCKERFILE.read_text()
