"""The deploy artifacts, checked offline: no Docker engine and no cluster run here.

Each artifact is checked twice: by the tool that owns its format (hadolint, the compose-spec
schema, the Kubernetes schemas, promtool for PromQL) and by wiring checks that read the files
together, because a file can be valid and still point at a port, path or name nothing serves.
The compose and Kubernetes configs discover their backends by DNS, so ``balancer check`` runs
them against a real DNS server on loopback (tests/support/dns.py) standing in for Docker's and
the cluster's, answering the service name with one address per replica.
The live half (a real scrape, real Prometheus queries, scaling) is tests/test_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.cli import build_parser
from balancer.config import BackendConfig, Config
from balancer.loading import load_config
from tests.support.dns import DNSServer
from tests.support.net import free_port, name_app, run_app
from tests.support.proc import BalancerProcess, pool_config, write_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
STACK_CONFIG = ROOT / "deploy" / "compose" / "balancer.yaml"
BROKEN_CONFIG = ROOT / "deploy" / "concentrated.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "balancer.json"
KUBE = ROOT / "deploy" / "kubernetes"

#: The metric names dashboards and alerts may rely on (issue 4's contract).
METRICS = {
    "balancer_requests_total", "balancer_request_duration_seconds", "balancer_backend_in_flight",
    "balancer_backend_up", "balancer_backend_traffic_share", "balancer_upstream_errors_total",
    "balancer_rejected_requests_total", "balancer_pool_concentrated", "balancer_pool_panic",
    "balancer_config_reloads_total", "balancer_pool_too_few_in_rotation",
    "balancer_config_rollbacks_total",
}
_METRIC_RE = re.compile(r"\bbalancer_[a-z_]+")
#: Kubernetes versions to validate against: an older one still widely run, and the newest.
KUBE_VERSIONS = ("1.30.0", "latest")
#: Where the test DNS server says the replicas are (only the guard looks: nothing connects).
LOOPBACK = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} not found: it comes with `pip install -e '.[test]'`")
    return path


def run(*cmd: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def balancer_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "balancer", "check", "-c", str(path))


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


def asking(dns: DNSServer, text: str, path: Path) -> Path:
    """A copy of the config ``text`` at ``path`` that asks ``dns`` instead of the system's
    nameservers (in the container and the pod, Docker's and the cluster's DNS are the system's)."""
    data = yaml.safe_load(text)
    assert "resolver" not in data, "the deployed config asks the system's resolver"
    path.write_text(yaml.safe_dump({**data, "resolver": [dns.nameserver]}, sort_keys=False))
    return path


def discovered_entry(config: Config) -> BackendConfig:
    """The pool's one backend entry: a DNS name standing for every replica."""
    (pool,) = config.pools.values()
    (entry,) = [b for b in pool.backends if b.discovery == "dns"]
    return entry


def metric_names(expr: str) -> set[str]:
    """Metric families named in a PromQL expression (histogram series → their family)."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in _METRIC_RE.findall(expr)}


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_hadolint_passes() -> None:
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


def test_image_is_multi_stage_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0].upper(), "a build stage, then the final image"
    final = final_stage()
    assert final[0][1].startswith("python:3.11-slim")
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric, so Kubernetes runAsNonRoot can verify it"
    runs = " ".join(args for word, args in final if word == "RUN")
    for compiler in ("gcc", "build-essential", "g++", "clang"):
        assert compiler not in runs, f"no {compiler} in the final image"
    copies = [args for word, args in final if word == "COPY"]
    assert not copies, "the final stage installs wheels only (bind-mounted from the build stage)"


def test_entrypoint_runs_balancer_with_the_documented_config_path() -> None:
    final = dict(final_stage())
    assert json.loads(final["ENTRYPOINT"]) == ["balancer", "run"], "exec form: python is PID 1"
    assert json.loads(final["CMD"]) == ["-c", "/etc/balancer/balancer.yaml"]
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert "/etc/balancer/balancer.yaml" in DOCKERFILE.read_text().split("FROM")[0], \
        "the config path is documented at the top"


def test_build_context_holds_every_copied_path() -> None:
    """Each COPY source exists and .dockerignore lets it through (a whitelist)."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = []
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
    # The package data the app reads at run time is inside the copied package.
    assert (ROOT / "balancer" / "demo_backends.py").exists(), "compose's web service runs it"


def test_build_stage_wheel_holds_what_the_image_runs(tmp_path: Path) -> None:
    """The build stage's `pip wheel .`, on a context holding only what the Dockerfile copies:
    the wheel the final image installs has the CLI entry point, the admin dashboard's assets
    and the demo backend the compose stack runs."""
    context = tmp_path / "context"
    context.mkdir()
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from" not in args:
            *sources, _ = args.split()
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, context / source,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, context / source)
    result = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                 str(tmp_path / "wheels"), ".", cwd=context, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("balancer-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    assert "balancer = balancer.cli:main" in entry_points, "ENTRYPOINT runs `balancer`"
    packaged = {p.relative_to(ROOT).as_posix() for p in (ROOT / "balancer").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert packaged <= names, f"not in the image: {sorted(packaged - names)}"


def healthcheck_command() -> list[str]:
    args = dict(final_stage())["HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3:].strip())


def test_healthcheck_asks_the_admin_healthz() -> None:
    cmd = healthcheck_command()
    env_line = next(args for word, args in final_stage() if word == "ENV")
    assert "BALANCER_HEALTH_URL=http://127.0.0.1:9100/healthz" in env_line
    assert cmd[0] == "python" and "BALANCER_HEALTH_URL" in cmd[-1]


async def test_healthcheck_command_against_a_running_balancer(tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run as Docker would, against a real `balancer run`: healthy
    while it serves, unhealthy once it has drained and exited on SIGTERM (the STOPSIGNAL)."""
    admin = free_port()
    env = {**os.environ, "BALANCER_HEALTH_URL": f"http://127.0.0.1:{admin}/healthz"}

    def healthcheck() -> int:
        return run(*healthcheck_command(), env=env, timeout=10).returncode

    async with run_app(name_app("one")) as one, run_app(name_app("two")) as two:
        config = write_config(tmp_path / "balancer.yaml", {
            "listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{admin}",
            "drain_timeout": "2s", "pools": {"web": pool_config([one, two])}})
        async with BalancerProcess(config) as balancer:
            assert await asyncio.to_thread(healthcheck) == 0, balancer.log
            balancer.send(signal.SIGTERM)
            assert await balancer.wait_exit() == 0, balancer.log
            assert await asyncio.to_thread(healthcheck) != 0


# --------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periodd:"))
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0 and "stop_grace_periodd" in result.stdout


def test_docker_compose_config_when_the_plugin_is_installed() -> None:
    """`docker compose config` needs only the client; it is not installed on every machine."""
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        pytest.skip("the docker compose plugin is not installed (the schema test covers the file)")
    result = run(docker, "compose", "-f", str(COMPOSE), "config", "--quiet")
    assert result.returncode == 0, result.stderr


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path → host path (relative to the compose file) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        out[container] = host
    return out


def published(service: dict[str, Any]) -> dict[int, str]:
    """container port → the published spec."""
    return {int(p.rsplit(":", 1)[1]): p for p in service.get("ports", [])}


def test_compose_bind_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for host in bind_mounts(service).values():
            assert (ROOT / host).exists(), f"services.{name}: mounts {host}, which does not exist"


def test_compose_balancer_reads_the_stack_config_and_serves_8080() -> None:
    services = compose()["services"]
    balancer = services["balancer"]
    mount = bind_mounts(balancer)["/etc/balancer"]
    assert (ROOT / mount / "balancer.yaml").resolve() == STACK_CONFIG
    config = load_config(STACK_CONFIG)
    assert config.listen.port == 8080 and published(balancer)[8080] == "8080:8080"
    # Prometheus (another container) scrapes the admin address: it must not be loopback-only,
    # and the host sees it on its own loopback only.
    assert config.admin.host == "0.0.0.0"
    assert published(balancer)[config.admin.port].startswith("127.0.0.1:")
    # The token demo-break sends.
    script = (ROOT / "deploy" / "demo-break.sh").read_text()
    assert config.admin_token and config.admin_token in script


def test_compose_pool_discovers_the_web_service_replicas() -> None:
    """One `discovery: dns` entry for the compose service name: Docker's DNS answers it with
    every replica, so `docker compose up --scale web=N` feeds the pool."""
    services = compose()["services"]
    config = load_config(STACK_CONFIG)
    assert config.resolver == (), "Docker's DNS (127.0.0.11) is the container's system resolver"
    (pool,) = config.pools.values()
    entry = discovered_entry(config)
    assert pool.backends == (entry,)
    web = services[entry.host]
    assert web["deploy"]["replicas"] >= config.guard.min_backends, "the guard would refuse it"
    assert f"os.environ.get('PORT', '{entry.port}')" in web["entrypoint"][-1]
    assert f":{entry.port}/healthz" in web["healthcheck"]["test"][-1]
    assert "NAME" not in web.get("environment", {}), "each replica names itself"
    # balancer resolves the name at start: the replicas must be up (and healthy) first.
    assert services["balancer"]["depends_on"][entry.host] == {"condition": "service_healthy"}
    assert not [name for name in services if re.fullmatch(r"web\d+", name)], \
        "no hand-listed copies of the web service"


def replicas_config(kind: str) -> tuple[str, int]:
    """(config text, replica count) of the compose stack or the Kubernetes manifests."""
    if kind == "compose":
        return STACK_CONFIG.read_text(), compose()["services"]["web"]["deploy"]["replicas"]
    return (kube("ConfigMap", "balancer-config")["data"]["balancer.yaml"],
            kube("Deployment", "web")["spec"]["replicas"])


@pytest.mark.parametrize("kind", ["compose", "kubernetes"])
def test_check_accepts_the_replicas_and_refuses_a_collapse_to_one(
        kind: str, dns_server: DNSServer, tmp_path: Path) -> None:
    """`balancer check` of the deployed config, its service name answered by a real DNS server:
    one address per replica is accepted, each a backend with an equal share; a name that
    collapses to one address (the service scaled to 1) is refused."""
    text, replicas = replicas_config(kind)
    path = asking(dns_server, text, tmp_path / "balancer.yaml")
    entry = discovered_entry(load_config(path))
    dns_server.set(entry.host, LOOPBACK[:replicas])
    ok = balancer_check(path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for ip in LOOPBACK[:replicas]:
        assert f"{entry.name}@{ip}:{entry.port}   {round(100 / replicas)}%" in ok.stdout, ok.stdout
    assert dns_server.queries_for(entry.host), "the check asked the DNS server"

    dns_server.set(entry.host, LOOPBACK[:1])
    one = balancer_check(path)
    assert one.returncode == 1, one.stdout + one.stderr
    assert (f"only 1 distinct active backend: backend {entry.name}@{LOOPBACK[0]}:{entry.port}"
            f" would receive 100% of traffic") in one.stderr


def test_break_config_is_refused_while_the_replicas_resolve(
        dns_server: DNSServer, tmp_path: Path) -> None:
    """demo-break's config is refused with every replica in DNS: the guard judges what the
    config does with them (one pinned replica takes 100%), not how many there are."""
    replicas = compose()["services"]["web"]["deploy"]["replicas"]
    dns_server.set("web", LOOPBACK[:replicas])
    refused = balancer_check(asking(dns_server, BROKEN_CONFIG.read_text(), tmp_path / "b.yaml"))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert ("only 1 distinct active backend: backend web-1 would receive 100% of traffic"
            in refused.stderr)


def test_break_config_differs_from_the_stack_config_only_by_the_maintenance_edit() -> None:
    """demo-break shows one change: the fleet drained by weight and one replica pinned by its
    compose container name, nothing else."""
    live = yaml.safe_load(STACK_CONFIG.read_text())
    broken = yaml.safe_load(BROKEN_CONFIG.read_text())
    fleet, pinned = broken["pools"]["web"]["backends"]
    assert fleet.pop("weight") == 0
    port = discovered_entry(load_config(STACK_CONFIG)).port
    assert pinned == {"name": "web-1", "url": f"http://{compose()['name']}-web-1:{port}"}, \
        "a container compose names <project>-web-1, which Docker's DNS resolves"
    broken["pools"]["web"]["backends"] = [fleet]
    assert broken == live


def test_prometheus_scrapes_balancer_and_loads_the_alert_rules() -> None:
    services = compose()["services"]
    prom = yaml.safe_load(PROMETHEUS.read_text())
    mounts = bind_mounts(services["prometheus"])
    assert (ROOT / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    (rules,) = prom["rule_files"]
    assert (ROOT / mounts[rules]).resolve() == ROOT / "config" / "alerts.yml"
    assert (ROOT / "config" / "alerts.yml").exists()
    (job,) = prom["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "balancer" and int(port) == load_config(STACK_CONFIG).admin.port
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """`promtool check config`, with the rule path pointed at the repository's alerts.yml."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    prom = yaml.safe_load(PROMETHEUS.read_text())
    prom["rule_files"] = [str(ROOT / "config" / "alerts.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(prom))
    result = run(promtool, "check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard() -> None:
    services = compose()["services"]
    mounts = bind_mounts(services["grafana"])
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in services and published(services["prometheus"])[9090]
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "balancer.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (ROOT / mounts[dashboards_dir]).resolve() == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    # Every panel asks the provisioned datasource.
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


# --------------------------------------------------------------------------- the dashboard


def dashboard_panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def dashboard_queries() -> Iterator[tuple[str, str]]:
    for panel in dashboard_panels():
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def test_dashboard_covers_the_per_backend_counters() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    # requests per backend, traffic share, errors, latency, health: all of the contract, in fact.
    assert used == METRICS, f"missing from the dashboard: {METRICS - used}"
    for panel in dashboard_panels():
        assert panel["targets"], f"{panel['title']}: no query"


def test_dashboard_queries_use_only_contract_metric_names() -> None:
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{title}: no balancer metric in {expr!r}"
        assert names <= METRICS, f"{title}: unknown metric {names - METRICS} in {expr!r}"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']}: wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the default variable values (all pools)."""
    return expr.replace("$__rate_interval", "30s").replace("$pool", ".*")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule), offline."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_use_only_contract_metric_names() -> None:
    alerts = ROOT / "config" / "alerts.yml"
    if not alerts.exists():
        pytest.fail("config/alerts.yml is missing: docker-compose.yml mounts it into Prometheus")
    for group in yaml.safe_load(alerts.read_text())["groups"]:
        for rule in group["rules"]:
            names = metric_names(str(rule["expr"]))
            assert names <= METRICS, f"{rule.get('alert')}: unknown metric {names - METRICS}"


# --------------------------------------------------------------------------- Kubernetes


def kube_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def kube(kind: str, name: str) -> dict[str, Any]:
    for _, doc in kube_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} under deploy/kubernetes")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    kinds = []
    for path, doc in kube_docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["ConfigMap", "Deployment", "Deployment",
                                    "PodDisruptionBudget", "Service", "Service"])


def test_kubernetes_schema_check_is_not_vacuous() -> None:
    import kubernetes_validate

    deployment = kube("Deployment", "balancer")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def kube_config(tmp_path: Path) -> Path:
    data = kube("ConfigMap", "balancer-config")["data"]
    path = tmp_path / "balancer.yaml"
    path.write_text(data["balancer.yaml"])
    return path


def test_kubernetes_deployment_wiring(tmp_path: Path) -> None:
    config = load_config(kube_config(tmp_path))
    deployment = kube("Deployment", "balancer")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}
    # The kubelet probes the pod IP: the admin address must listen beyond loopback.
    assert config.admin.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}, probe
    # The config file the container reads is the ConfigMap's key.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == "balancer-config"
    assert mount["mountPath"] == "/etc/balancer"
    # The image's ENTRYPOINT (`balancer run`) with these args, as the real parser reads them:
    # that config file, watched, so a ConfigMap update reaches running replicas.
    assert "command" not in container, "the image's ENTRYPOINT runs"
    run_args = build_parser().parse_args(["run", *container["args"]])
    assert run_args.config == f"{mount['mountPath']}/balancer.yaml"
    assert run_args.watch, "--watch: ConfigMap updates are reloaded, the guard deciding"
    # SIGTERM drains: the grace period covers preStop's pause plus drain_timeout.
    assert spec["terminationGracePeriodSeconds"] > config.drain_timeout + 5
    # Same non-root user as the image.
    uid = next(a for w, a in final_stage() if w == "USER").split(":")[0]
    assert spec["securityContext"]["runAsUser"] == int(uid)
    assert deployment["spec"]["replicas"] >= 2
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = kube("Service", "balancer")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}, "admin stays off it"
    pdb = kube("PodDisruptionBudget", "balancer")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_kubernetes_pool_discovers_the_headless_service_pods(tmp_path: Path) -> None:
    config = load_config(kube_config(tmp_path))
    assert config.resolver == (), "the cluster's DNS is the pod's system resolver"
    (pool,) = config.pools.values()
    entry = discovered_entry(config)
    assert pool.backends == (entry,)
    service = kube("Service", "web")
    assert entry.host == service["metadata"]["name"], "the short name: balancer's own namespace"
    assert service["spec"]["clusterIP"] == "None", "headless: DNS answers with pod addresses"
    assert not service["spec"].get("publishNotReadyAddresses"), "only ready pods are in DNS"
    (port,) = service["spec"]["ports"]
    assert entry.port == port["port"]
    web = kube("Deployment", "web")
    assert web["spec"]["replicas"] >= config.guard.min_backends, "the guard would refuse it"
    pod = web["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert {"name": port["targetPort"], "containerPort": entry.port, "protocol": "TCP"} \
        in container["ports"]
    # A terminating pod leaves DNS at once; it keeps serving until balancer has re-resolved.
    (command,) = container["lifecycle"]["preStop"]["exec"]["command"][-1:]
    pause = re.search(r"time\.sleep\((\d+)\)", command)
    assert pause and int(pause.group(1)) > entry.resolve_interval
    assert pod["spec"].get("terminationGracePeriodSeconds", 30) > int(pause.group(1))


# --------------------------------------------------------------------------- Makefile


def test_makefile_targets_exist() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = run(make, "-n", "demo-break", "stack", "stack-check", "up", "image", "deploy-check")
    assert result.returncode == 0, result.stderr
    assert "deploy/demo-break.sh" in result.stdout and "deploy/local-stack.py" in result.stdout
    scale = run(make, "-n", "scale", "N=5")
    assert scale.returncode == 0 and "up -d --scale web=5" in scale.stdout, scale.stderr
    assert "web" in compose()["services"], "the service `make scale` scales"
