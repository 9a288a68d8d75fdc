"""The deployment files in docker/: compose.yaml validated by docker-compose itself (no engine needed), the KubeRay
manifest and the Dockerfile read as data, prometheus.yml checked by promtool, and the Grafana dashboard's every
query checked against what renderfarm/metrics.py really exports (scraped from a real Redis) and evaluated by
promtool over those series. None of them runs here: no machine of the project has a container engine or a GPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
KUBERAY = DOCKER / "kuberay.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
PROMETHEUS = DOCKER / "prometheus.yml"
DASHBOARD = DOCKER / "grafana-dashboard.json"
SECRET_NAMES = ("REDIS_PASSWORD", "RAY_AUTH_TOKEN", "RENDERFARM_DASHBOARD_TOKEN", "GRAFANA_ADMIN_PASSWORD")
PUBLISHED = {"dashboard", "api", "prometheus", "grafana"}  # on the host's loopback, unless an operator says otherwise


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


def test_compose_validates_and_has_its_eight_services(rendered):
    assert set(rendered["services"]) == {"redis", "minio", "head", "worker", "dashboard", "api", "prometheus",
                                         "grafana"}


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


def test_dashboard_api_prometheus_and_grafana_are_published_on_loopback_only(rendered):
    dashboard = rendered["services"]["dashboard"]
    assert dashboard["command"][0] == "dashboard"
    assert dashboard["environment"]["RENDERFARM_DASHBOARD_TOKEN"] == _env_example()["RENDERFARM_DASHBOARD_TOKEN"]
    for name, service in rendered["services"].items():
        if name in PUBLISHED:
            assert service["ports"] and all(_host_ip(p) == "127.0.0.1" for p in service["ports"]), (name, service)
        else:
            assert not service.get("ports"), f"{name} publishes a port on the host"
    assert "RENDERFARM_API_BIND" in COMPOSE.read_text(), "an operator can publish the API for the studio"


def test_api_runs_renderfarm_api_with_the_redis_url_in_its_environment(rendered):
    secrets = _env_example()
    api = rendered["services"]["api"]
    command = api["command"]
    assert command[0] == "api" and command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert api["environment"]["RENDERFARM_REDIS_URL"] == f"redis://:{secrets['REDIS_PASSWORD']}@redis:6379/0"
    assert not any(secrets["REDIS_PASSWORD"] in str(part) for part in command)
    assert [str(p.get("target")) if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0]
            for p in api["ports"]] == [port]
    assert f"127.0.0.1:{port}/v1/health" in " ".join(api["healthcheck"]["test"])
    assert "container_name" not in api, "it is stateless: nothing should stop `--scale api=N`"
    assert "token create" in (DOCKER / "README.md").read_text(), "the README says the API needs an admin token"


def _bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of a rendered service's bind mounts (named volumes left out)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if str(source).startswith("/"):
            out.append((Path(source), target))
    return out


def test_every_file_compose_mounts_is_in_the_repository(rendered):
    mounted = {}
    for name, service in rendered["services"].items():
        for source, target in _bind_mounts(service):
            assert source.is_file(), f"{name} mounts {source}, which is not a file of the repository"
            assert DOCKER in source.parents, f"{name} mounts {source} from outside docker/"
            mounted[target] = source
    assert mounted["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    # Grafana: the data source and dashboard providers, and the dashboard where the provider looks for it.
    provisioning = {target: yaml.safe_load(source.read_text()) for target, source in mounted.items()
                    if target.startswith("/etc/grafana/provisioning")}
    providers = [p for doc in provisioning.values() for p in doc.get("providers", [])]
    (provider,) = providers
    dashboards = [t for t, s in mounted.items() if s == DASHBOARD]
    assert dashboards and all(Path(t).parent == Path(provider["options"]["path"]) for t in dashboards)
    (datasource,) = [d for doc in provisioning.values() for d in doc.get("datasources", [])]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus" and url.hostname == "prometheus" and url.port == 9090
    assert rendered["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == \
        _env_example()["GRAFANA_ADMIN_PASSWORD"]


def test_no_secret_is_written_in_compose_yaml():
    text = COMPOSE.read_text()
    for name, value in _env_example().items():
        assert not value or value not in text, f"{name}'s value is in compose.yaml"
    raw = yaml.safe_load(text)
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|REDIS_URL|AUTH", key):
                assert "${" in str(value), f"{name}.environment.{key} is not taken from a variable"
    command = raw["services"]["redis"]["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")


# --- docker/prometheus.yml and docker/grafana-dashboard.json ---------------------------------------------


def test_prometheus_scrapes_the_api_once_with_a_token(rendered, tmp_path):
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    api = rendered["services"]["api"]["command"]
    assert targets == [f"api:{api[api.index('--port') + 1]}"], "one address for the farm: every replica reports it all"
    # In token mode /metrics wants a token: the file Prometheus reads it from is the one its container writes first.
    token_file = job["authorization"]["credentials_file"]
    prometheus = rendered["services"]["prometheus"]
    (script,) = prometheus["command"]
    assert prometheus["entrypoint"] == ["/bin/sh", "-c"]
    writes = rf"umask 077 && printf '%s' \"\$+RENDERFARM_METRICS_TOKEN\" > {token_file} &&\s+exec /bin/prometheus "
    assert re.search(writes, script), script
    assert "--config.file=/etc/prometheus/prometheus.yml" in script
    assert "RENDERFARM_METRICS_TOKEN" in prometheus["environment"]
    assert "RENDERFARM_METRICS_TOKEN=" in ENV_EXAMPLE.read_text()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    token = tmp_path / "token"
    token.write_text("rft_example")
    checked = tmp_path / "prometheus.yml"
    checked.write_text(PROMETHEUS.read_text().replace(token_file, str(token)))  # promtool checks the file exists
    done = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside it
    return out


def _queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_grafana_dashboard_is_an_importable_dashboard(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for item in (panel, *panel["targets"]):
            assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def _scraped(store) -> list:
    """The metric families of one scrape of a farm with a bit of everything in it: jobs of two teams in every
    state, a node with every total, webhook deliveries, an incident, both histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    from renderfarm.metrics import render_metrics
    from tests.integration.test_metrics import finish, jobs

    store.submit(jobs(4, "a", team="anim", ago=3.0), "b1")
    store.submit(jobs(2, "l", team="light"), "b2")
    for job_id in ("a0", "a1", "a2", "l0"):
        assert store.lease(job_id, "n1", 60)
    for job_id in ("a0", "a1"):
        assert store.start(job_id, "n1", 60)
    assert finish(store, "n1", ["a0"]) == [True]
    store.cancel("l1")
    store.register_node("n1", {"state": "busy", "images": 9, "megapixels": 0.5, "jobs_done": 1, "jobs_failed": 0,
                               "batches": 1, "render_seconds": 2.0, "model_loads": 1, "oom_escalations": 0,
                               "vram_used_gib": 2.0, "vram_gib": 8, "loaded": ["tiny-sd15"]})
    for name, n in (("webhook_delivered", 2), ("webhook_failed", 1), ("webhook_attempts", 4), ("leases_expired", 1)):
        store.count(name, n)
    return list(text_string_to_metric_families(render_metrics(store)[0].decode()))


SELECTOR = re.compile(r"(renderfarm_\w+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(renderfarm_\w+)\s*,\s*(\w+)\s*\)")


@pytest.mark.integration
def test_every_dashboard_query_names_metrics_and_labels_the_collector_exports(store, dashboard):
    """A real cross-check: the metric names each query uses are ones renderfarm/metrics.py exports, and the labels
    it selects on or groups by are labels those metrics carry in a real scrape."""
    from renderfarm.metrics import METRIC_NAMES

    labels: dict[str, set[str]] = {}
    for family in _scraped(store):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    assert set(labels) == METRIC_NAMES, "the scrape holds every metric the collector can export"
    used = set()
    for expr in _queries(dashboard):
        names = []
        for name, matchers in SELECTOR.findall(expr):
            assert name in METRIC_NAMES, f"{name} (in {expr!r}) is not a metric renderfarm exports"
            names.append(name)
            for label in MATCHER.findall(matchers):
                assert label in labels[name], f"{name} has no label {label!r} (in {expr!r})"
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert any(label in labels[n] for n in names), f"no metric of {expr!r} has the label {label!r}"
        for name, label in LABEL_VALUES.findall(expr):
            assert label in labels[name], f"label_values: {name} has no label {label!r}"
        assert names, f"{expr!r} uses no renderfarm metric"
        used.update(names)
    # What issue 18 asks the dashboard to show.
    exprs = " ".join(_queries(dashboard))
    for wanted in ("renderfarm_jobs", "renderfarm_team_jobs", "renderfarm_node_images_total",
                   "renderfarm_node_megapixels_total", "renderfarm_node_vram_used_bytes",
                   "renderfarm_node_model_loads_total", "renderfarm_node_oom_escalations_total",
                   "renderfarm_webhook_deliveries_total"):
        assert wanted in used, f"the dashboard shows nothing of {wanted}"
    for histogram in ("renderfarm_job_wait_seconds", "renderfarm_job_render_seconds"):
        for q in ("0.5", "0.95"):
            quantile = rf"histogram_quantile\({q}, sum by \(le\) \(rate\({histogram}_bucket\["
            assert re.search(quantile, exprs), (histogram, q)
    assert "rate(renderfarm_node_images_total" in exprs and "rate(renderfarm_node_megapixels_total" in exprs


@pytest.mark.integration
def test_promtool_evaluates_every_dashboard_query_to_data(store, dashboard, tmp_path):
    """Every panel's query, as Prometheus runs it, over the series of a real scrape (counters and buckets rising
    by one a sample, gauges flat, 15 s apart for 30 minutes): each parses and returns at least one series."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    series = []
    for family in _scraped(store):
        for sample in family.samples:
            rising = sample.name.endswith(("_total", "_bucket", "_count", "_sum"))
            labels = {**sample.labels, "job": "renderfarm", "instance": "api:8000"}
            selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            series.append({"series": f"{sample.name}{{{selector}}}", "values": f"{sample.value}+{int(rising)}x120"})
    variables = {"$node": ".*", "$team": ".*"}
    tests = []
    for expr in (t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])):
        for name, value in variables.items():
            expr = expr.replace(name, value)
        tests.append({"expr": f"clamp_max(count({expr}), 1)", "eval_time": "30m",
                      "exp_samples": [{"labels": "{}", "value": 1}]})
    spec = tmp_path / "dashboard_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": [
        {"interval": "15s", "input_series": series, "promql_expr_test": tests}]}))
    done = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


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


def test_kuberay_api_deployment_and_its_service(manifests):
    api = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == "renderfarm-api")
    pod = api["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "api" and args[args.index("--host") + 1] == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    env = _env(container)
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert "$(REDIS_PASSWORD)" in env["RENDERFARM_REDIS_URL"]["value"]
    (named,) = container["ports"]
    assert named["containerPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v1/health", "port": named["name"]}
    assert api["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    service = next(m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == "renderfarm-api")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [named["name"]]
    assert "token create" in KUBERAY.read_text(), "the file says the API needs an admin token"


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
