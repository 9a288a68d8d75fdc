"""The deployment files in docker/: compose.yaml validated by docker-compose itself (no engine needed), the KubeRay
manifest and the Dockerfile read as data. None of them runs here: no machine of the project has a container
engine or a GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
KUBERAY = DOCKER / "kuberay.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SECRET_NAMES = ("REDIS_PASSWORD", "RAY_AUTH_TOKEN", "RENDERFARM_DASHBOARD_TOKEN")


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("the docker-compose binary is not installed (Debian: apt-get install docker-compose; .ci/run does)")
    # Variables in our own environment would win over the env file: leave them out, and anything of compose's own.
    env = {k: v for k, v in os.environ.items() if k not in _env_example() and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )


@pytest.fixture(scope="module")
def rendered() -> dict:
    done = _compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


# --- docker/compose.yaml ---------------------------------------------------------------------------------


def test_env_example_holds_placeholders_for_every_secret():
    values = _env_example()
    for name in SECRET_NAMES:
        assert values.get(name, "").startswith("CHANGE-ME"), name
    assert "secrets.token_urlsafe(32)" in ENV_EXAMPLE.read_text()


def test_compose_validates_and_has_the_five_services(rendered):
    assert set(rendered["services"]) == {"redis", "minio", "head", "worker", "dashboard"}


def test_compose_refuses_to_render_without_the_secrets(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = _compose_config(empty)
    assert done.returncode != 0
    assert "REDIS_PASSWORD" in done.stderr or "RAY_AUTH_TOKEN" in done.stderr, done.stderr


def test_redis_persists_and_requires_the_password(rendered):
    redis = rendered["services"]["redis"]
    command = redis["command"]
    assert redis["image"].startswith("redis:7")
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert command[command.index("--requirepass") + 1] == _env_example()["REDIS_PASSWORD"]
    assert any(str(v).endswith(":/data") or ":/data:" in str(v) for v in redis["volumes"]), "its AOF needs a volume"
    assert "healthcheck" in redis


def test_head_and_worker_run_the_renderfarm_commands(rendered):
    secrets = _env_example()
    url = f"redis://:{secrets['REDIS_PASSWORD']}@redis:6379/0"
    head, worker = rendered["services"]["head"], rendered["services"]["worker"]
    assert head["command"][:3] == ["up", "--head", "--no-workers"]
    assert worker["command"][:3] == ["worker", "--address", "head:6379"]
    for service in (head, worker):
        assert service["environment"]["RENDERFARM_REDIS_URL"] == url
        assert service["environment"]["RAY_AUTH_TOKEN"] == secrets["RAY_AUTH_TOKEN"]
        # The password travels in the environment, never on a command line that `ps` on the host shows.
        assert not any(secrets["REDIS_PASSWORD"] in str(part) for part in service["command"])
    assert "6379" in [str(p) for p in head.get("expose", [])]
    assert "entrypoint" not in head, "the head takes RAY_AUTH_TOKEN from its environment, like the workers"


def test_worker_reserves_gpus_and_nothing_blocks_scaling(rendered):
    worker = rendered["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpu and (gpu[0].get("count") == "all" or int(gpu[0].get("count", 0)) >= 1 or gpu[0].get("device_ids"))
    assert "container_name" not in worker and "ports" not in worker, "both would stop `--scale worker=N`"


def _host_ip(port) -> str | None:
    if isinstance(port, dict):  # the long syntax
        return port.get("host_ip")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else None


def test_dashboard_is_published_on_loopback_only(rendered):
    dashboard = rendered["services"]["dashboard"]
    assert dashboard["command"][0] == "dashboard"
    assert dashboard["ports"] and all(_host_ip(p) == "127.0.0.1" for p in dashboard["ports"]), dashboard["ports"]
    assert dashboard["environment"]["RENDERFARM_DASHBOARD_TOKEN"] == _env_example()["RENDERFARM_DASHBOARD_TOKEN"]
    for name, service in rendered["services"].items():
        if name != "dashboard":
            assert not service.get("ports"), f"{name} publishes a port on the host"


def test_no_secret_is_written_in_compose_yaml():
    text = COMPOSE.read_text()
    for name, value in _env_example().items():
        assert value not in text, f"{name}'s value is in compose.yaml"
    raw = yaml.safe_load(text)
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|REDIS_URL|AUTH", key):
                assert "${" in str(value), f"{name}.environment.{key} is not taken from a variable"
    command = raw["services"]["redis"]["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")


# --- docker/kuberay.yaml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc]


def _one(manifests, kind: str) -> dict:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_raycluster_runs_renderfarm_head(manifests):
    cluster = _one(manifests, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    script = " ".join(head["command"] + head["args"])
    assert "renderfarm up --head --no-workers" in script
    env = _env(head)
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "ray-auth-token"
    assert "$(REDIS_PASSWORD)" in env["RENDERFARM_REDIS_URL"]["value"]
    assert head.get("livenessProbe") and head.get("readinessProbe"), "else KubeRay injects probes Ray cannot answer"


def test_kuberay_has_two_worker_groups_for_two_kinds_of_card(manifests):
    groups = _one(manifests, "RayCluster")["spec"]["workerGroupSpecs"]
    assert len(groups) == 2
    assert len({g["groupName"] for g in groups}) == 2
    selectors = []
    for group in groups:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert "renderfarm worker --address" in " ".join(container["command"] + container["args"])
        assert _env(container)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "renderfarm-secrets"
        assert _env(container)["RAY_AUTH_MODE"]["value"] == "token"
        assert container.get("livenessProbe") and container.get("readinessProbe")
        selectors.append(tuple(sorted(pod["nodeSelector"].items())))
    assert len(set(selectors)) == 2, "each group must land on its own kind of card"


def test_kuberay_redis_persists_with_a_password_and_no_secret_is_written(manifests):
    redis = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == "renderfarm-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert not [m for m in manifests if m["kind"] == "Secret"], "secrets are created with kubectl, not kept here"
    for m in manifests:
        for spec in _pod_specs(m):
            for container in spec["containers"]:
                for e in container.get("env", []):
                    if re.search(r"PASSWORD|TOKEN", e["name"]):
                        assert "valueFrom" in e, f"{m['metadata']['name']}: {e['name']} is written in the file"


def _pod_specs(manifest: dict) -> list[dict]:
    if manifest["kind"] == "Deployment":
        return [manifest["spec"]["template"]["spec"]]
    if manifest["kind"] == "RayCluster":
        spec = manifest["spec"]
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return []


# --- docker/Dockerfile -----------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package_and_runs_as_a_non_root_user():
    instructions = _instructions()
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"pip install [^&]*torch==2\.13\.0", runs)
    assert re.search(r"pip install \.(\s|$)", runs)
    assert "redis-server" in runs
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "HF_HOME=/cache" in env and "RENDERFARM_CACHE_DIR=/cache" in env
    assert ("ENTRYPOINT", '["renderfarm"]') in instructions
    assert any(kw == "FROM" for kw, _ in instructions)
    assert "nvidia/cuda:" in DOCKERFILE.read_text()


def test_ci_installs_docker_compose():
    assert "docker-compose" in (ROOT / ".ci" / "run").read_text()
